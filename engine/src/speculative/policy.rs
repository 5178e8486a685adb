//! Draft-length policies: how many tokens the draft model proposes per round.
//!
//! `Fixed(k)` always proposes `k`. `Adaptive` starts from HF transformers'
//! heuristic (`num_assistant_tokens`: +2 after a fully accepted round, -1
//! otherwise) and, once it has measured both the acceptance rate and the
//! draft/target cost ratio, switches to choosing the `k` that maximises the
//! expected wall-time improvement of Leviathan et al. (2023, section 3):
//! `(1 - a^(k+1)) / ((1 - a) (k c + 1))`. When no `k` beats plain decoding it
//! returns 0 ("decode plainly this round") and re-probes with a small `k`
//! every few rounds so speculation can turn back on.
//!
//! That formula assumes a verify pass over `k + 1` tokens costs one decode
//! step. Where it does not (a CPU, a large batch), the caller can report
//! measured times with [`DraftLengthPolicy::observe_timing`]: the policy then
//! fits the target pass time as `alpha + beta * tokens` (decayed least
//! squares over the rounds it saw) and maximises the expected tokens per
//! second `E(a, k) / (k d + alpha + beta (k + 1))` instead, with `d` the
//! draft step time.

/// Expected tokens emitted per target pass with `k` drafts when each draft
/// is accepted independently with probability `a`:
/// `1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a)`, and `k + 1` when `a == 1`.
/// `a` is clamped into `[0, 1]`; NaN counts as 0.
pub fn expected_tokens_per_pass(a: f64, k: usize) -> f64 {
    let a = if a.is_nan() { 0.0 } else { a.clamp(0.0, 1.0) };
    let n = k as f64 + 1.0;
    if a >= 1.0 {
        return n;
    }
    // expm1/ln_1p keep this accurate as a approaches 1, where the plain
    // formula cancels catastrophically; for a == 0 it gives exactly 1.
    let one_minus_a = 1.0 - a;
    -(n * (-one_minus_a).ln_1p()).exp_m1() / one_minus_a
}

/// Expected wall-time speed-up over plain decoding with `k` drafts,
/// acceptance rate `a` and cost ratio `c` = draft step time / target step
/// time: `expected_tokens_per_pass(a, k) / (k c + 1)`. `k = 0` gives 1.
/// Negative or NaN `c` counts as 0.
pub fn speedup_bound(a: f64, k: usize, c: f64) -> f64 {
    let c = if c.is_nan() { 0.0 } else { c.max(0.0) };
    expected_tokens_per_pass(a, k) / (k as f64 * c + 1.0)
}

/// Settings of the adaptive policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveConfig {
    /// Draft length before any observation.
    pub initial_k: usize,
    /// Smallest draft length when speculating (at least 1).
    pub min_k: usize,
    /// Largest draft length.
    pub max_k: usize,
    /// Weight kept by past observations each round (0..1); about
    /// `1 / (1 - decay)` recent rounds dominate the estimates.
    pub decay: f64,
    /// Speculating rounds to observe before trusting the model (the HF
    /// heuristic is used until then, and whenever no cost was reported).
    pub warmup_rounds: usize,
    /// While speculation is off, probe once after this many plain rounds.
    pub reprobe_every: usize,
    /// Draft length used for a probe (clamped into `min_k..=max_k`).
    pub probe_k: usize,
    /// Expected speed-up below which speculation is turned off.
    pub min_speedup: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self {
            initial_k: 4,
            min_k: 1,
            max_k: 8,
            decay: 0.9,
            warmup_rounds: 4,
            reprobe_every: 16,
            probe_k: 2,
            min_speedup: 1.0,
        }
    }
}

/// State of the adaptive policy; use through [`DraftLengthPolicy`].
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptivePolicy {
    config: AdaptiveConfig,
    /// HF's `num_assistant_tokens`, kept within `min_k..=max_k`.
    heuristic_k: usize,
    /// Exponentially decayed counts of accepted drafts and of acceptance
    /// trials (accepted drafts plus the rejected one, if any): their ratio
    /// is the maximum-likelihood per-token acceptance rate.
    accepted: f64,
    trials: f64,
    rounds_observed: usize,
    /// Exponentially weighted draft/target cost ratio, once reported.
    cost: Option<f64>,
    /// Consecutive plain (k = 0) rounds.
    rounds_off: usize,
    /// Measured times, when the caller reports them.
    timing: Timing,
}

/// Decayed sums for the least-squares fit `target_time = alpha + beta * tokens`
/// and the mean draft step time.
#[derive(Debug, Clone, Default, PartialEq)]
struct Timing {
    w: f64,
    t: f64,
    tt: f64,
    y: f64,
    ty: f64,
    draft: Option<f64>,
}

impl Timing {
    fn add(&mut self, decay: f64, tokens: f64, secs: f64) {
        for v in [
            &mut self.w,
            &mut self.t,
            &mut self.tt,
            &mut self.y,
            &mut self.ty,
        ] {
            *v *= decay;
        }
        self.w += 1.0;
        self.t += tokens;
        self.tt += tokens * tokens;
        self.y += secs;
        self.ty += tokens * secs;
    }

    /// `(alpha, beta)` once passes of at least two sizes were seen; the slope is
    /// kept non-negative and the intercept positive.
    fn fit(&self) -> Option<(f64, f64)> {
        if self.w < 2.0 {
            return None;
        }
        let mean_t = self.t / self.w;
        let var = self.tt / self.w - mean_t * mean_t;
        if var < 0.1 {
            return None;
        }
        let beta = ((self.ty / self.w - mean_t * self.y / self.w) / var).max(0.0);
        let alpha = self.y / self.w - beta * mean_t;
        (alpha > 0.0).then_some((alpha, beta))
    }
}

impl AdaptivePolicy {
    /// A fresh policy; the config is sanitised (`1 <= min_k <= max_k`,
    /// `initial_k` and `probe_k` within them, `decay` in `[0, 1)`).
    pub fn new(config: AdaptiveConfig) -> Self {
        let mut config = config;
        config.min_k = config.min_k.max(1);
        config.max_k = config.max_k.max(config.min_k);
        config.initial_k = config.initial_k.clamp(config.min_k, config.max_k);
        config.probe_k = config.probe_k.clamp(config.min_k, config.max_k);
        config.decay = if config.decay.is_finite() {
            config.decay.clamp(0.0, 0.999)
        } else {
            AdaptiveConfig::default().decay
        };
        Self {
            heuristic_k: config.initial_k,
            config,
            accepted: 0.0,
            trials: 0.0,
            rounds_observed: 0,
            cost: None,
            rounds_off: 0,
            timing: Timing::default(),
        }
    }

    /// The (sanitised) configuration.
    pub fn config(&self) -> &AdaptiveConfig {
        &self.config
    }

    /// Estimated per-token acceptance rate, once a draft was verified.
    pub fn acceptance_rate(&self) -> Option<f64> {
        (self.trials > 0.0).then(|| self.accepted / self.trials)
    }

    /// Estimated draft/target cost ratio, once reported.
    pub fn cost_ratio(&self) -> Option<f64> {
        self.cost
    }

    /// The `k` in `min_k..=max_k` with the best expected speed-up (the
    /// smallest such `k` on ties) and that speed-up.
    fn best_k(&self, a: f64, c: f64) -> (usize, f64) {
        let timed = match (self.timing.fit(), self.timing.draft) {
            (Some(fit), Some(d)) => Some((fit, d)),
            _ => None,
        };
        let mut best = (self.config.min_k, f64::NEG_INFINITY);
        for k in self.config.min_k..=self.config.max_k {
            let s = match timed {
                // Speed-up over plain steps of alpha + beta.
                Some(((alpha, beta), d)) => {
                    let round = k as f64 * d + alpha + beta * (k as f64 + 1.0);
                    expected_tokens_per_pass(a, k) * (alpha + beta) / round
                }
                None => speedup_bound(a, k, c),
            };
            if s > best.1 {
                best = (k, s);
            }
        }
        best
    }

    fn next_k(&self) -> usize {
        let cost = self.cost.or(self.timing.draft.map(|_| 0.0));
        let model = match (self.acceptance_rate(), cost) {
            (Some(a), Some(c)) if self.rounds_observed >= self.config.warmup_rounds => Some((a, c)),
            _ => None,
        };
        let Some((a, c)) = model else {
            return self.heuristic_k;
        };
        let (k, speedup) = self.best_k(a, c);
        if speedup >= self.config.min_speedup {
            k
        } else if self.rounds_off >= self.config.reprobe_every {
            self.config.probe_k
        } else {
            0
        }
    }

    fn observe(&mut self, proposed: usize, accepted: usize) {
        // Decay every round, plain ones too, so a probe after a long pause
        // weighs more against the stale estimate.
        self.accepted *= self.config.decay;
        self.trials *= self.config.decay;
        if proposed == 0 {
            self.rounds_off = self.rounds_off.saturating_add(1);
            return;
        }
        self.rounds_off = 0;
        let accepted = accepted.min(proposed);
        self.accepted += accepted as f64;
        self.trials += accepted as f64 + if accepted < proposed { 1.0 } else { 0.0 };
        self.rounds_observed = self.rounds_observed.saturating_add(1);
        // HF's update, compared with what was actually proposed (the caller
        // may propose fewer near the length limit).
        self.heuristic_k = if accepted == proposed {
            self.heuristic_k.saturating_add(2)
        } else {
            self.heuristic_k.saturating_sub(1)
        }
        .clamp(self.config.min_k, self.config.max_k);
    }

    fn observe_timing(&mut self, k: usize, draft_step: f64, target_pass: f64) {
        if !(target_pass.is_finite() && target_pass > 0.0) {
            return;
        }
        let d = self.config.decay;
        self.timing.add(d, k as f64 + 1.0, target_pass);
        if k > 0 && draft_step.is_finite() && draft_step >= 0.0 {
            self.timing.draft = Some(match self.timing.draft {
                None => draft_step,
                Some(old) => d * old + (1.0 - d) * draft_step,
            });
            if target_pass > 0.0 {
                self.observe_cost(draft_step / target_pass);
            }
        }
    }

    fn observe_cost(&mut self, c: f64) {
        if !c.is_finite() || c < 0.0 {
            return;
        }
        let d = self.config.decay;
        self.cost = Some(match self.cost {
            None => c,
            Some(old) => d * old + (1.0 - d) * c,
        });
    }
}

/// How many draft tokens to propose each round.
#[derive(Debug, Clone, PartialEq)]
pub enum DraftLengthPolicy {
    /// Always `k` (0 disables speculation).
    Fixed(usize),
    /// HF heuristic, then expected-speed-up maximisation; see the module doc.
    Adaptive(AdaptivePolicy),
}

impl DraftLengthPolicy {
    /// An adaptive policy with [`AdaptiveConfig::default`].
    pub fn adaptive() -> Self {
        Self::Adaptive(AdaptivePolicy::new(AdaptiveConfig::default()))
    }

    /// An adaptive policy with the given settings.
    pub fn adaptive_with(config: AdaptiveConfig) -> Self {
        Self::Adaptive(AdaptivePolicy::new(config))
    }

    /// Draft length for the next round; 0 means decode plainly this round.
    pub fn next_k(&self) -> usize {
        match self {
            Self::Fixed(k) => *k,
            Self::Adaptive(p) => p.next_k(),
        }
    }

    /// Reports a finished round: `proposed` drafts, `accepted` of them
    /// accepted (a plain round is `observe(0, 0)`). Call once per round.
    pub fn observe(&mut self, proposed: usize, accepted: usize) {
        if let Self::Adaptive(p) = self {
            p.observe(proposed, accepted);
        }
    }

    /// Reports a decode round's measured times in seconds: one draft step (ignored
    /// when `k == 0`) and the target pass over `k + 1` tokens. Lets the adaptive
    /// policy account for verify passes that cost more than a decode step.
    pub fn observe_timing(&mut self, k: usize, draft_step: f64, target_pass: f64) {
        if let Self::Adaptive(p) = self {
            p.observe_timing(k, draft_step, target_pass);
        }
    }

    /// Reports a measured cost ratio: draft step time / target step time.
    /// Non-finite or negative values are ignored.
    pub fn observe_cost(&mut self, c: f64) {
        if let Self::Adaptive(p) = self {
            p.observe_cost(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::Rng;

    #[test]
    fn expected_tokens_formula() {
        assert_eq!(expected_tokens_per_pass(0.0, 5), 1.0);
        assert_eq!(expected_tokens_per_pass(1.0, 5), 6.0);
        assert!((expected_tokens_per_pass(0.5, 2) - 1.75).abs() < 1e-12);
        assert_eq!(expected_tokens_per_pass(0.7, 0), 1.0);
        // Continuous at a -> 1 (no cancellation blow-up).
        let near = expected_tokens_per_pass(1.0 - 1e-13, 7);
        assert!((near - 8.0).abs() < 1e-9, "{near}");
        // Out-of-range inputs are clamped.
        assert_eq!(expected_tokens_per_pass(1.5, 3), 4.0);
        assert_eq!(expected_tokens_per_pass(f64::NAN, 3), 1.0);
    }

    #[test]
    fn speedup_formula() {
        let s = speedup_bound(0.8, 4, 0.1);
        let want = (1.0 - 0.8f64.powi(5)) / (0.2 * 1.4);
        assert!((s - want).abs() < 1e-12);
        assert_eq!(speedup_bound(0.3, 0, 5.0), 1.0);
        assert_eq!(speedup_bound(1.0, 3, -1.0), 4.0);
    }

    #[test]
    fn fixed_ignores_observations() {
        let mut p = DraftLengthPolicy::Fixed(3);
        p.observe(3, 0);
        p.observe_cost(10.0);
        assert_eq!(p.next_k(), 3);
    }

    #[test]
    fn hf_heuristic_trace_without_cost() {
        let mut p = DraftLengthPolicy::adaptive();
        let mut trace = vec![p.next_k()];
        for accepted_all in [
            true, true, true, false, false, false, false, false, false, false, true,
        ] {
            let k = p.next_k();
            p.observe(k, if accepted_all { k } else { k / 2 });
            trace.push(p.next_k());
        }
        assert_eq!(trace, vec![4, 6, 8, 8, 7, 6, 5, 4, 3, 2, 1, 3]);
    }

    #[test]
    fn config_is_sanitised() {
        let p = AdaptivePolicy::new(AdaptiveConfig {
            initial_k: 50,
            min_k: 0,
            max_k: 0,
            decay: f64::NAN,
            ..AdaptiveConfig::default()
        });
        let c = p.config();
        assert_eq!((c.min_k, c.max_k, c.initial_k, c.probe_k), (1, 1, 1, 1));
        assert_eq!(c.decay, 0.9);
    }

    /// Runs `rounds` rounds where each draft is accepted independently with
    /// probability `a`, reporting cost `c` each round; returns the policy.
    fn simulate(a: f64, c: f64, rounds: usize, seed: u64) -> DraftLengthPolicy {
        let mut p = DraftLengthPolicy::adaptive();
        let mut rng = Rng::new(seed);
        for _ in 0..rounds {
            let k = p.next_k();
            let accepted = (0..k).take_while(|_| rng.next_f64() < a).count();
            p.observe(k, accepted);
            p.observe_cost(c);
        }
        p
    }

    /// A world where a target pass over `t` tokens takes `1 + beta (t - 1)` and a
    /// draft step `d`, each draft accepted with probability `a`.
    fn simulate_timed(a: f64, d: f64, beta: f64, rounds: usize) -> DraftLengthPolicy {
        let mut p = DraftLengthPolicy::adaptive();
        let mut rng = Rng::new(7);
        for _ in 0..rounds {
            let k = p.next_k();
            let accepted = (0..k).take_while(|_| rng.next_f64() < a).count();
            p.observe(k, accepted);
            p.observe_timing(k, d, 1.0 + beta * k as f64);
        }
        p
    }

    #[test]
    fn timed_policy_accounts_for_costly_verify_passes() {
        // Free verify passes: long drafts pay off.
        let free = simulate_timed(0.8, 0.05, 0.0, 200).next_k();
        // Each extra verified token costs 30% of a step: the best k is short.
        let costly = simulate_timed(0.8, 0.05, 0.3, 200).next_k();
        let best = |beta: f64| {
            (1..=8)
                .max_by(|&x, &y| {
                    let s = |k: usize| {
                        expected_tokens_per_pass(0.8, k) / (k as f64 * 0.05 + 1.0 + beta * k as f64)
                    };
                    s(x).total_cmp(&s(y))
                })
                .unwrap_or(1)
        };
        assert!(free >= 6, "free verify: k = {free}");
        assert!(
            costly.abs_diff(best(0.3)) <= 1,
            "costly verify: k = {costly}, best {}",
            best(0.3)
        );
        assert!(costly < free);
        // So costly that nothing pays: speculation turns off.
        assert_eq!(simulate_timed(0.3, 0.3, 0.8, 200).next_k(), 0);
    }

    #[test]
    fn adaptive_turns_off_at_tiny_acceptance_and_high_cost() {
        let p = simulate(0.02, 0.6, 30, 1);
        assert_eq!(p.next_k(), 0);
    }

    #[test]
    fn adaptive_picks_large_k_at_high_acceptance_and_low_cost() {
        let p = simulate(0.95, 0.05, 60, 2);
        assert!(p.next_k() >= 7, "k = {}", p.next_k());
        if let DraftLengthPolicy::Adaptive(a) = &p {
            let rate = a.acceptance_rate().unwrap_or(0.0);
            assert!(rate > 0.85, "rate {rate}");
        }
    }

    #[test]
    fn adaptive_picks_small_k_at_moderate_acceptance() {
        let p = simulate(0.6, 0.3, 60, 3);
        let k = p.next_k();
        assert!((1..=3).contains(&k), "k = {k}");
    }

    #[test]
    fn turns_off_then_reprobes_and_turns_back_on() {
        let cfg = AdaptiveConfig::default();
        let mut p = DraftLengthPolicy::adaptive();
        for _ in 0..cfg.warmup_rounds {
            let k = p.next_k();
            p.observe(k, 0);
            p.observe_cost(0.5);
        }
        assert_eq!(p.next_k(), 0);
        for round in 0..2 {
            // Plain rounds (no draft ran, so no cost report) until a probe.
            let mut plain = 0;
            while p.next_k() == 0 {
                p.observe(0, 0);
                plain += 1;
                assert!(plain <= cfg.reprobe_every);
            }
            assert_eq!(plain, cfg.reprobe_every);
            let k = p.next_k();
            assert_eq!(k, cfg.probe_k);
            if round == 0 {
                // A failed probe: speculation stays off.
                p.observe(k, 0);
                p.observe_cost(0.5);
                assert_eq!(p.next_k(), 0);
            } else {
                // The draft got good (e.g. a repetitive stretch): back on.
                p.observe(k, k);
                p.observe_cost(0.05);
                assert!(p.next_k() >= 1);
            }
        }
    }

    #[test]
    fn over_reported_acceptance_is_clamped() {
        let mut p = DraftLengthPolicy::adaptive();
        p.observe(2, 5);
        if let DraftLengthPolicy::Adaptive(a) = &p {
            assert_eq!(a.acceptance_rate(), Some(1.0));
        }
        p.observe_cost(f64::NAN);
        p.observe_cost(-1.0);
        if let DraftLengthPolicy::Adaptive(a) = &p {
            assert_eq!(a.cost_ratio(), None);
        }
    }
}
