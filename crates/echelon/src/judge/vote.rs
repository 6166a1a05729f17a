//! Combining the samples of one item: score aggregates and pairwise majorities.

use super::options::{Aggregate, Preference};

/// The aggregate of `scores`; `None` when there are none.
pub fn aggregate(scores: &[f64], how: Aggregate) -> Option<f64> {
    if scores.is_empty() {
        return None;
    }
    let mut sorted = scores.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(match how {
        Aggregate::Mean => sorted.iter().sum::<f64>() / sorted.len() as f64,
        Aggregate::Median => {
            let mid = sorted.len() / 2;
            if sorted.len() % 2 == 1 {
                sorted[mid]
            } else {
                (sorted[mid - 1] + sorted[mid]) / 2.0
            }
        }
        Aggregate::Majority => {
            // Sorted, so runs of equal scores are adjacent; the first longest run is the
            // lowest of the most frequent scores.
            let (mut best, mut best_n) = (sorted[0], 0usize);
            let mut i = 0;
            while i < sorted.len() {
                let mut j = i;
                while j < sorted.len() && sorted[j] == sorted[i] {
                    j += 1;
                }
                if j - i > best_n {
                    best = sorted[i];
                    best_n = j - i;
                }
                i = j;
            }
            best
        }
    })
}

/// Population standard deviation of `scores`; `None` when empty.
pub fn stdev(scores: &[f64]) -> Option<f64> {
    if scores.is_empty() {
        return None;
    }
    let n = scores.len() as f64;
    let mean = scores.iter().sum::<f64>() / n;
    Some((scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt())
}

/// The most frequent preference; `tie` when no verdict is more frequent than every
/// other; `None` when there are none.
pub fn majority(prefs: &[Preference]) -> Option<Preference> {
    if prefs.is_empty() {
        return None;
    }
    let count = |p| prefs.iter().filter(|x| **x == p).count();
    let (a, b, t) = (
        count(Preference::A),
        count(Preference::B),
        count(Preference::Tie),
    );
    Some(if a > b && a > t {
        Preference::A
    } else if b > a && b > t {
        Preference::B
    } else {
        Preference::Tie
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn aggregates() {
        let s = [7.0, 3.0, 7.0, 9.0];
        assert_eq!(aggregate(&s, Aggregate::Mean), Some(6.5));
        assert_eq!(aggregate(&s, Aggregate::Median), Some(7.0));
        assert_eq!(aggregate(&[1.0, 4.0], Aggregate::Median), Some(2.5));
        assert_eq!(aggregate(&s, Aggregate::Majority), Some(7.0));
        assert_eq!(aggregate(&[8.0, 2.0], Aggregate::Majority), Some(2.0));
        assert_eq!(aggregate(&[], Aggregate::Mean), None);
        assert_eq!(stdev(&[2.0, 4.0]), Some(1.0));
        assert_eq!(stdev(&[5.0]), Some(0.0));
        use Preference::*;
        assert_eq!(majority(&[A, A, B]), Some(A));
        assert_eq!(majority(&[A, B]), Some(Tie));
        assert_eq!(majority(&[B, Tie, B]), Some(B));
        assert_eq!(majority(&[]), None);
    }
}
