//! What a load generator sends: which key (hot, uniform, Zipf, sequential)
//! and which value.

use std::{
    fmt,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use rand::{Rng, rngs::SmallRng};

/// How keys are chosen. Key `i` is named `{prefix}k{i}`; the hot key is
/// `{prefix}hot` (index 0).
#[derive(Debug, Clone, PartialEq)]
pub enum KeySpec {
    /// One key for every request.
    Hot,
    /// Uniform over `k` keys.
    Uniform(u32),
    /// Zipf over `k` keys with exponent `s` (rank 1 most frequent).
    Zipf(u32, f64),
    /// Keys 0, 1, 2, ... across all connections, wrapping at `k`: a run of
    /// `k` items touches `k` distinct keys.
    Seq(u32),
}

impl KeySpec {
    /// How many distinct keys the spec can produce.
    pub fn key_count(&self) -> u32 {
        match self {
            KeySpec::Hot => 1,
            KeySpec::Uniform(k) | KeySpec::Zipf(k, _) | KeySpec::Seq(k) => *k,
        }
    }

    /// The key's name after the prefix.
    pub fn key_suffix(&self, index: u32) -> String {
        match self {
            KeySpec::Hot => "hot".to_owned(),
            _ => format!("k{index}"),
        }
    }

    /// Index of a key suffix produced by [`key_suffix`](Self::key_suffix).
    pub fn parse_suffix(&self, suffix: &str) -> Option<u32> {
        match self {
            KeySpec::Hot => (suffix == "hot").then_some(0),
            _ => suffix
                .strip_prefix('k')?
                .parse()
                .ok()
                .filter(|i| *i < self.key_count()),
        }
    }
}

impl FromStr for KeySpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split(':').collect();
        let count = |s: &str| -> Result<u32, String> {
            match s.parse::<u32>() {
                Ok(k) if k > 0 => Ok(k),
                _ => Err(format!("key count must be 1..=4294967295, found {s:?}")),
            }
        };
        match parts.as_slice() {
            ["hot"] => Ok(KeySpec::Hot),
            ["uniform", k] => Ok(KeySpec::Uniform(count(k)?)),
            ["seq", k] => Ok(KeySpec::Seq(count(k)?)),
            ["zipf", k] => Ok(KeySpec::Zipf(count(k)?, 1.0)),
            ["zipf", k, s] => {
                let s: f64 = s
                    .parse()
                    .map_err(|_| format!("zipf exponent must be a number, found {s:?}"))?;
                if !(s > 0.0 && s.is_finite()) {
                    return Err("zipf exponent must be > 0".to_owned());
                }
                Ok(KeySpec::Zipf(count(k)?, s))
            }
            _ => Err(format!(
                "expected hot, uniform:K, zipf:K[:s] or seq:K, found {text:?}"
            )),
        }
    }
}

impl fmt::Display for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySpec::Hot => write!(f, "hot"),
            KeySpec::Uniform(k) => write!(f, "uniform:{k}"),
            KeySpec::Zipf(k, s) => write!(f, "zipf:{k}:{s}"),
            KeySpec::Seq(k) => write!(f, "seq:{k}"),
        }
    }
}

/// Draws key indices for a [`KeySpec`]; cheap to clone (shared tables).
#[derive(Clone)]
pub struct KeySampler {
    spec: KeySpec,
    /// Zipf: cumulative probabilities by rank.
    cdf: Arc<[f64]>,
    /// Seq: the next index, shared by every clone.
    next: Arc<AtomicU64>,
}

impl KeySampler {
    pub fn new(spec: &KeySpec) -> Self {
        let cdf: Arc<[f64]> = match spec {
            KeySpec::Zipf(k, s) => {
                let mut acc = 0.0;
                let mut cdf: Vec<f64> = (1..=*k)
                    .map(|rank| {
                        acc += 1.0 / f64::from(rank).powf(*s);
                        acc
                    })
                    .collect();
                for c in &mut cdf {
                    *c /= acc;
                }
                cdf.into()
            }
            _ => Arc::new([]),
        };
        Self {
            spec: spec.clone(),
            cdf,
            next: Arc::default(),
        }
    }

    pub fn spec(&self) -> &KeySpec {
        &self.spec
    }

    /// The next key index.
    pub fn sample(&self, rng: &mut SmallRng) -> u32 {
        match self.spec {
            KeySpec::Hot => 0,
            KeySpec::Uniform(k) => rng.random_range(0..k),
            KeySpec::Zipf(k, _) => {
                let u: f64 = rng.random();
                (self.cdf.partition_point(|c| *c < u) as u32).min(k - 1)
            }
            KeySpec::Seq(k) => (self.next.fetch_add(1, Ordering::Relaxed) % u64::from(k)) as u32,
        }
    }
}

/// Which value each increment carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueSpec {
    Fixed(i64),
    /// Uniform over `lo..=hi`.
    Range(i64, i64),
}

impl ValueSpec {
    pub fn sample(&self, rng: &mut SmallRng) -> i64 {
        match *self {
            ValueSpec::Fixed(v) => v,
            ValueSpec::Range(lo, hi) => rng.random_range(lo..=hi),
        }
    }
}

impl FromStr for ValueSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("expected an integer or LO..=HI, found {text:?}");
        if let Some((lo, hi)) = text.split_once("..=") {
            let lo: i64 = lo.trim().parse().map_err(|_| bad())?;
            let hi: i64 = hi.trim().parse().map_err(|_| bad())?;
            if lo > hi {
                return Err(format!("empty range {text:?}"));
            }
            return Ok(ValueSpec::Range(lo, hi));
        }
        let text = text.strip_prefix("fixed:").unwrap_or(text);
        text.trim().parse().map(ValueSpec::Fixed).map_err(|_| bad())
    }
}

impl fmt::Display for ValueSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueSpec::Fixed(v) => write!(f, "{v}"),
            ValueSpec::Range(lo, hi) => write!(f, "{lo}..={hi}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn specs_parse_and_print() {
        for text in ["hot", "uniform:100000", "zipf:1000:1.1", "seq:1000000"] {
            assert_eq!(text.parse::<KeySpec>().unwrap().to_string(), text);
        }
        assert_eq!("zipf:10".parse::<KeySpec>(), Ok(KeySpec::Zipf(10, 1.0)));
        assert!("uniform:0".parse::<KeySpec>().is_err());
        assert!("zipf:10:-1".parse::<KeySpec>().is_err());
        assert!("cold".parse::<KeySpec>().is_err());
        assert_eq!(
            "-1000..=1000".parse::<ValueSpec>(),
            Ok(ValueSpec::Range(-1000, 1000))
        );
        assert_eq!("1".parse::<ValueSpec>(), Ok(ValueSpec::Fixed(1)));
        assert_eq!("fixed:7".parse::<ValueSpec>(), Ok(ValueSpec::Fixed(7)));
        assert!("3..=1".parse::<ValueSpec>().is_err());
    }

    #[test]
    fn suffixes_round_trip() {
        let spec = KeySpec::Uniform(10);
        assert_eq!(spec.parse_suffix(&spec.key_suffix(7)), Some(7));
        assert_eq!(spec.parse_suffix("k10"), None);
        assert_eq!(KeySpec::Hot.parse_suffix("hot"), Some(0));
    }

    #[test]
    fn zipf_favours_low_ranks_and_stays_in_range() {
        let sampler = KeySampler::new(&KeySpec::Zipf(1000, 1.0));
        let mut rng = SmallRng::seed_from_u64(1);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[sampler.sample(&mut rng) as usize] += 1;
        }
        // P(rank 1) = 1 / H(1000) ≈ 0.134.
        assert!((12_000..15_000).contains(&counts[0]), "{}", counts[0]);
        assert!(counts[0] > counts[1] && counts[1] > counts[9]);
    }

    #[test]
    fn seq_visits_every_key_once_per_lap() {
        let sampler = KeySampler::new(&KeySpec::Seq(5));
        let other = sampler.clone();
        let mut rng = SmallRng::seed_from_u64(1);
        let got: Vec<u32> = (0..10)
            .map(|i| {
                if i % 2 == 0 {
                    sampler.sample(&mut rng)
                } else {
                    other.sample(&mut rng)
                }
            })
            .collect();
        assert_eq!(got, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]);
    }
}
