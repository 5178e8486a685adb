//! [`Backend::warp_rows`] and [`Backend::penalized_argmax_rows`] on the GPU: sampled
//! rows are warped by the device kernel and only their distributions cross to the host;
//! penalised greedy rows only their tokens. Rows `warp_rows` gets with greedy parameters
//! or parameters that do not validate, and the rare rows the kernel leaves to the host
//! (no usable logit, or a `+inf` one), take the host's [`warp_penalised`], so every error
//! and edge case is the host's.

use falconer_kernels::{PenaltySpec, ProbsSpec, WarpedRow};

use super::{check_cols, map_err, CudaBackend, CudaTensor};
use crate::backend::{host_row, penalized_argmax_on_host, Backend, WarpRow, WarpedRows};
use crate::error::BackendError;
use crate::sampling::{warp_penalised, warp_probs};

/// Whether the kernel takes a row (the rest are warped on the host).
fn on_device(r: &WarpRow<'_>) -> bool {
    r.params.validate().is_ok() && !r.params.is_greedy()
}

pub(super) fn warp_rows(
    b: &CudaBackend,
    x: &CudaTensor,
    cols: usize,
    rows: &[WarpRow<'_>],
) -> Result<WarpedRows, BackendError> {
    check_cols("warp_rows", x, cols)?;
    let device = b.device_warp();
    let specs: Vec<ProbsSpec<'_>> = rows
        .iter()
        .filter(|r| device && on_device(r))
        .map(|r| ProbsSpec {
            row: r.row,
            temperature: r.params.temperature,
            top_k: r.params.top_k,
            top_p: r.params.top_p,
            repetition_penalty: r.params.repetition_penalty,
            penalized: r.context,
        })
        .collect();
    let mut warped = b
        .gpu
        .warp_probs_rows(x.f32("warp_rows")?, x.rows, cols, &specs)
        .map_err(map_err)?
        .into_iter();
    let host = if specs.len() < rows.len() {
        b.to_host(x)?
    } else {
        Vec::new()
    };
    rows.iter()
        .map(|r| {
            if device && on_device(r) {
                return match warped.next() {
                    Some(WarpedRow::Probs(p)) => Ok(Ok(p)),
                    // Already penalised.
                    Some(WarpedRow::Logits(l)) => Ok(warp_probs(&l, r.params)),
                    None => Err(BackendError::Device {
                        op: "warp_rows",
                        message: "fewer warped rows than asked for".into(),
                    }),
                };
            }
            let row = host_row("warp_rows", &host, cols, r.row)?;
            Ok(warp_penalised(row, r.context, r.params))
        })
        .collect()
}

pub(super) fn penalized_argmax_rows(
    b: &CudaBackend,
    x: &CudaTensor,
    cols: usize,
    rows: &[WarpRow<'_>],
) -> Result<Vec<Option<u32>>, BackendError> {
    check_cols("penalized_argmax_rows", x, cols)?;
    if !b.device_warp() {
        return penalized_argmax_on_host(&b.to_host(x)?, cols, rows);
    }
    let specs: Vec<PenaltySpec<'_>> = rows
        .iter()
        .map(|r| PenaltySpec {
            row: r.row,
            repetition_penalty: r.params.repetition_penalty,
            penalized: r.context,
        })
        .collect();
    b.gpu
        .penalized_argmax_rows(x.f32("penalized_argmax_rows")?, x.rows, cols, &specs)
        .map_err(map_err)
}
