//! How sure a figure is: a bootstrap over the rounds. Pure.
//!
//! A row's ratio is the agent's median over raw QEMU's. On shared machines
//! a rerun of the same code moves it by a fifth or more, so a row misses
//! its goal only when the whole 95% interval lies above it. Rounds run
//! agent and raw in turn, so they are resampled in pairs: what slowed the
//! machine during a round slowed both sides.
//!
//! A latency percentile under load is judged the same way, with the
//! seconds of the load as its rounds: a stall of the machine delays every
//! call made during it, so calls are resampled a second at a time.

/// Resamples per interval: enough for stable 2.5% and 97.5% points.
const RESAMPLES: usize = 2000;

/// A fixed seed, so a report is reproducible from its samples.
const SEED: u64 = 0x6b76_6d2d_6167_656e;

/// The 95% bootstrap interval of `median(agent) / median(raw)`.
/// Rounds are paired by index where both sides have the same count,
/// resampled independently otherwise. `None` without samples.
pub fn ratio_interval(agent: &[f64], raw: &[f64]) -> Option<(f64, f64)> {
    if agent.is_empty() || raw.is_empty() {
        return None;
    }
    let paired = agent.len() == raw.len();
    let mut rng = SplitMix64(SEED);
    let mut ratios = Vec::with_capacity(RESAMPLES);
    let (mut a, mut r) = (
        Vec::with_capacity(agent.len()),
        Vec::with_capacity(raw.len()),
    );
    for _ in 0..RESAMPLES {
        a.clear();
        r.clear();
        for _ in 0..agent.len() {
            let i = rng.below(agent.len());
            a.push(agent[i]);
            if paired {
                r.push(raw[i]);
            }
        }
        if !paired {
            r.extend((0..raw.len()).map(|_| raw[rng.below(raw.len())]));
        }
        ratios.push(median(&mut a) / median(&mut r));
    }
    ratios.sort_by(f64::total_cmp);
    let at = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
    Some((at(0.025), at(0.975)))
}

/// The 95% bootstrap interval of the `q` quantile of all samples, taking
/// whole blocks (the calls of one second, say) as the units resampled.
/// `None` without samples.
pub fn quantile_interval(blocks: &[Vec<f64>], q: f64) -> Option<(f64, f64)> {
    let blocks: Vec<&Vec<f64>> = blocks.iter().filter(|b| !b.is_empty()).collect();
    if blocks.is_empty() {
        return None;
    }
    let mut rng = SplitMix64(SEED);
    let mut pooled = Vec::new();
    let mut estimates = Vec::with_capacity(RESAMPLES);
    for _ in 0..RESAMPLES {
        pooled.clear();
        for _ in 0..blocks.len() {
            pooled.extend_from_slice(blocks[rng.below(blocks.len())]);
        }
        let at = ((pooled.len() - 1) as f64 * q).round() as usize;
        estimates.push(*pooled.select_nth_unstable_by(at, f64::total_cmp).1);
    }
    estimates.sort_by(f64::total_cmp);
    let at = |q: f64| estimates[((estimates.len() - 1) as f64 * q).round() as usize];
    Some((at(0.025), at(0.975)))
}

/// Where a row stands against its goal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The whole interval is at or under the goal.
    Met,
    /// The goal lies inside the interval: more rounds would tell.
    Undecided,
    /// The whole interval is above the goal.
    Missed,
}

/// Judges an interval against a goal.
pub fn verdict((low, high): (f64, f64), goal: f64) -> Verdict {
    if high <= goal {
        Verdict::Met
    } else if low > goal {
        Verdict::Missed
    } else {
        Verdict::Undecided
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[(values.len() - 1) / 2]
}

/// A small, fast generator (Steele, Lea and Flood's SplitMix64), enough
/// for resampling.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_sides_give_a_tight_interval_around_their_ratio() {
        let raw = vec![10.0; 20];
        let agent = vec![12.0; 20];
        assert_eq!(ratio_interval(&agent, &raw), Some((1.2, 1.2)));
        assert_eq!(ratio_interval(&[], &raw), None);
    }

    #[test]
    fn a_clear_gap_is_missed_and_noise_around_the_goal_is_undecided() {
        let raw: Vec<f64> = (0..20).map(|i| 50.0 + f64::from(i % 5)).collect();
        let slow: Vec<f64> = raw.iter().map(|r| r * 1.5).collect();
        let (low, high) = ratio_interval(&slow, &raw).unwrap();
        assert!(low > 1.10 && low <= 1.5 && high >= 1.5, "{low} {high}");
        assert_eq!(verdict((low, high), 1.10), Verdict::Missed);

        // Rounds where the machine stalled both sides at once.
        let noisy_raw: Vec<f64> = (0..20)
            .map(|i| if i % 3 == 0 { 90.0 } else { 50.0 })
            .collect();
        let noisy_agent: Vec<f64> = noisy_raw
            .iter()
            .enumerate()
            .map(|(i, r)| r * if i % 2 == 0 { 1.25 } else { 0.95 })
            .collect();
        let interval = ratio_interval(&noisy_agent, &noisy_raw).unwrap();
        assert!(interval.0 <= 1.10 && interval.1 > 1.10, "{interval:?}");
        assert_eq!(verdict(interval, 1.10), Verdict::Undecided);
        assert_eq!(verdict((0.9, 1.05), 1.10), Verdict::Met);
    }

    #[test]
    fn a_percentile_is_as_sure_as_its_seconds_agree() {
        let steady: Vec<Vec<f64>> = (0..10)
            .map(|_| (1..=100).map(f64::from).collect())
            .collect();
        assert_eq!(quantile_interval(&steady, 0.99), Some((99.0, 99.0)));
        assert_eq!(quantile_interval(&[], 0.99), None);
        assert_eq!(quantile_interval(&[Vec::new()], 0.99), None);

        // One second in ten stalled: how often the resamples draw it
        // decides their 99th percentile, so the interval takes in both.
        let mut stalled = steady.clone();
        stalled[3] = vec![500.0; 100];
        let (low, high) = quantile_interval(&stalled, 0.99).unwrap();
        assert!(low <= 100.0 && high >= 500.0, "{low} {high}");
        assert_eq!(verdict((low, high), 200.0), Verdict::Undecided);
    }

    #[test]
    fn unpaired_sides_are_resampled_each_on_its_own() {
        let raw = vec![10.0, 11.0, 9.0];
        let agent = vec![10.0, 10.5, 9.5, 10.0, 10.2];
        let (low, high) = ratio_interval(&agent, &raw).unwrap();
        assert!(low <= 1.0 && high >= 1.0, "{low} {high}");
    }
}
