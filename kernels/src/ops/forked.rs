//! Products queued on the GPU's second stream ([`Gpu::fork`]) beside the main stream's
//! work: one product ([`Gpu::fork_linear`], [`Gpu::fork_linear_accumulate`]) or a whole
//! MLP ([`Gpu::fork_mlp_product`]). Forked work allocates nothing, so each first reserves what
//! its GEMV launches take (outputs, split-K partials, arrival counters), as
//! `linear_span` makes them; and since cuBLAS is not a kernel launch of ours, only rows
//! that run on the GEMV kernels fork.

use half::bf16;

use super::check_len;
use super::linear::{ChunkKernel, Epilogue, GEMV_MAX_ROWS};
use super::pair::PairHalf;
use crate::error::KernelError;
use crate::gpu::{DeviceBuffer, Forked, Gpu, LaneReserve, ROW_INVARIANT_MAX_ROWS};

/// A product queued on a second stream: its output, once joined.
#[must_use = "the main stream must join the forked product before using its output"]
#[derive(Debug)]
pub struct ForkedProduct<'a> {
    // Dropped first: a dropped product joins before its buffer goes back to the pool.
    forked: Forked<'a>,
    out: DeviceBuffer<f32>,
}

impl ForkedProduct<'_> {
    /// Makes the thread's stream wait for the product; returns its output.
    pub fn join(self) -> Result<DeviceBuffer<f32>, KernelError> {
        self.forked.join()?;
        Ok(self.out)
    }
}

/// The split-K partials (lengths) and arrival counters that the GEMV launches of a
/// `rows`-row product with `n` outputs take, as `linear_span` launches them: one launch
/// per [`GEMV_MAX_ROWS`] rows, each, where `tensor_cores(its rows)`, split into `nsplit`
/// parts over K with a counter per one of `tiles` output tiles (partials only when
/// split).
fn gemv_scratch(
    rows: usize,
    n: usize,
    tensor_cores: impl Fn(usize) -> bool,
    (tiles, nsplit): (usize, usize),
) -> (Vec<usize>, usize) {
    let (mut partials, mut counters) = (Vec::new(), 0);
    for r0 in (0..rows).step_by(GEMV_MAX_ROWS) {
        let r = GEMV_MAX_ROWS.min(rows - r0);
        if nsplit > 1 && tensor_cores(r) {
            partials.push(nsplit * r * n);
            counters = tiles;
        }
    }
    (partials, counters)
}

impl Gpu {
    /// Whether a product of `rows` rows runs on the GEMV kernels whatever its shape, as
    /// forked products need: up to [`GEMV_MAX_ROWS`] rows, or [`ROW_INVARIANT_MAX_ROWS`]
    /// in row-invariant mode.
    pub fn gemv_takes_rows(&self, rows: usize) -> bool {
        rows <= GEMV_MAX_ROWS || (self.row_invariant() && rows <= ROW_INVARIANT_MAX_ROWS)
    }

    /// Adds to `reserve` the split-K partials and arrival counters that the GEMV
    /// launches of a `[rows, k] @ [n, k]^T` product take (a launch's partials go back to
    /// the fork's pool before the next launch on the lane takes them).
    fn reserve_gemv(
        &self,
        rows: usize,
        k: usize,
        n: usize,
        reserve: &mut LaneReserve,
    ) -> Result<(), KernelError> {
        if !self.gemv_takes_rows(rows) {
            return Err(KernelError::invalid(
                "fork",
                format!("a product of {rows} rows takes cuBLAS, which forked work may not call"),
            ));
        }
        let (tiles, nsplit, _) = self.tc_tiles(n, k);
        let exact = self.row_invariant();
        let tensor_cores = |r| self.chunk_kernel(r, k, exact) == ChunkKernel::TensorCores;
        let (partials, counters) = gemv_scratch(rows, n, tensor_cores, (tiles, nsplit));
        for len in partials {
            reserve.add_scratch(len);
        }
        reserve.counters = reserve.counters.max(counters);
        Ok(())
    }

    /// [`Gpu::linear_accumulate`] queued on a second stream for rows that
    /// [`Gpu::gemv_takes_rows`] (an error otherwise). The caller keeps `x`, `w`, `bias`
    /// and `acc` alive, and queues nothing that writes them, until it joins the returned
    /// [`Forked`].
    #[allow(clippy::too_many_arguments)]
    pub fn fork_linear_accumulate(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        k: usize,
        w: &DeviceBuffer<bf16>,
        n: usize,
        bias: Option<&DeviceBuffer<f32>>,
        acc: &mut DeviceBuffer<f32>,
        groups: &[usize],
    ) -> Result<Forked<'_>, KernelError> {
        check_len("linear", "accumulator", acc, rows * n)?;
        let half = PairHalf {
            w,
            n,
            bias,
            gelu: false,
        };
        self.fork_gemv(x, rows, k, None, half, Epilogue::Accumulate, acc, groups)
    }

    /// [`Gpu::linear`] queued on a second stream, as [`Gpu::fork_linear_accumulate`];
    /// its output comes with the join.
    #[allow(clippy::too_many_arguments)]
    pub fn fork_linear(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        k: usize,
        w: &DeviceBuffer<bf16>,
        n: usize,
        bias: Option<&DeviceBuffer<f32>>,
        groups: &[usize],
    ) -> Result<ForkedProduct<'_>, KernelError> {
        let half = PairHalf {
            w,
            n,
            bias,
            gelu: false,
        };
        self.fork_product(x, rows, k, None, half, groups)
    }

    /// Falcon's MLP `down(up(x))` for `x [rows, k]` (`up.w [up.n, k]`, `down.w [down.n,
    /// up.n]`, each with its bias and, where its `gelu` says, GELU: Falcon's on `up`)
    /// queued on a second stream: the same kernels, so the same bits, as the two
    /// products one after the other ([`Gpu::linear_gelu`] then [`Gpu::linear`]). As
    /// [`Gpu::fork_linear`] otherwise.
    pub fn fork_mlp_product(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        k: usize,
        up: PairHalf<'_>,
        down: PairHalf<'_>,
        groups: &[usize],
    ) -> Result<ForkedProduct<'_>, KernelError> {
        self.fork_product(x, rows, k, Some(up), down, groups)
    }

    /// `product` of `x [rows, k]`, or of `before`'s output when given, queued on a
    /// second stream into a new buffer that comes with the join.
    fn fork_product(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        k: usize,
        before: Option<PairHalf<'_>>,
        product: PairHalf<'_>,
        groups: &[usize],
    ) -> Result<ForkedProduct<'_>, KernelError> {
        let mut out = self.scratch::<f32>(rows * product.n)?;
        let forked = self.fork_gemv(
            x,
            rows,
            k,
            before,
            product,
            Epilogue::Store,
            &mut out,
            groups,
        )?;
        Ok(ForkedProduct { forked, out })
    }

    /// Queues `product` of `x [rows, k]` (or of `before`'s output, computed first with
    /// the epilogue its `gelu` says) on a second stream, into `out` with `epi`, with the
    /// scratch the GEMV launches take reserved first.
    #[allow(clippy::too_many_arguments)]
    fn fork_gemv(
        &self,
        x: &DeviceBuffer<f32>,
        rows: usize,
        k: usize,
        before: Option<PairHalf<'_>>,
        product: PairHalf<'_>,
        epi: Epilogue,
        out: &mut DeviceBuffer<f32>,
        groups: &[usize],
    ) -> Result<Forked<'_>, KernelError> {
        check_len("linear", "input", x, rows * k)?;
        let mut reserve = LaneReserve::none();
        let width = before.map_or(k, |b| b.n);
        if let Some(b) = before {
            self.reserve_gemv(rows, k, b.n, &mut reserve)?;
            // Its output, taken on the lane and held beside the partials.
            reserve.hold_scratch(rows * b.n);
        }
        self.reserve_gemv(rows, width, product.n, &mut reserve)?;
        let ((), forked) = self.fork_with(&reserve, || {
            let h = match before {
                Some(b) => {
                    let mut h = self.scratch::<f32>(rows * b.n)?;
                    self.linear_into(x, rows, k, b.w, b.n, b.bias, b.epilogue(), &mut h, groups)?;
                    Some(h)
                }
                None => None,
            };
            let p = product;
            let input = h.as_ref().unwrap_or(x);
            self.linear_into(input, rows, width, p.w, p.n, p.bias, epi, out, groups)
        })?;
        Ok(forked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemv_scratch_follows_the_launches() {
        // Falcon-7B's down projection split four ways: one launch per 8 rows.
        let (n, split) = (4544, (284, 4));
        assert_eq!(gemv_scratch(1, n, |_| true, split), (vec![4 * n], 284));
        assert_eq!(gemv_scratch(8, n, |_| true, split), (vec![4 * 8 * n], 284));
        assert_eq!(
            gemv_scratch(13, n, |_| true, split),
            (vec![4 * 8 * n, 4 * 5 * n], 284)
        );
        assert_eq!(
            gemv_scratch(16, n, |_| true, split),
            (vec![4 * 8 * n, 4 * 8 * n], 284)
        );
        // Unsplit, or on CUDA cores: nothing.
        assert_eq!(gemv_scratch(5, n, |_| true, (284, 1)), (vec![], 0));
        assert_eq!(gemv_scratch(5, n, |_| false, split), (vec![], 0));
        // Only the launches on tensor cores (a CUDA-core kernel for one row).
        assert_eq!(gemv_scratch(9, n, |r| r > 1, split), (vec![4 * 8 * n], 284));
    }
}
