//! The name of a counter, checked once where it enters the service.
//!
//! Every way in (`POST /increment`, `POST /increments`, `GET /counters/{key}`,
//! the `prefix` and `after` of `GET /counters`) parses its key into a
//! [`CounterKey`]; what lies behind the edge only ever sees valid keys.

use std::{borrow::Cow, fmt, ops::Deref};

/// Longest accepted key, in characters (the `varchar(255)` column).
pub const MAX_KEY_CHARS: usize = 255;

/// Why a string is not a counter key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {MAX_KEY_CHARS} characters long")]
    TooLong,
    /// PostgreSQL text cannot hold U+0000.
    #[error("must not contain the NUL character (U+0000)")]
    Nul,
}

/// A valid counter key: 1 to [`MAX_KEY_CHARS`] characters, no NUL; stored
/// verbatim (case, spaces, any other Unicode). Borrows from the request bytes
/// where it can.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CounterKey<'a>(Cow<'a, str>);

impl<'a> CounterKey<'a> {
    /// # Errors
    /// [`KeyError`] naming the rule `key` breaks.
    pub fn parse(key: impl Into<Cow<'a, str>>) -> Result<Self, KeyError> {
        let key = key.into();
        check_key_text(&key, false)?;
        Ok(Self(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_owned(self) -> CounterKey<'static> {
        CounterKey(Cow::Owned(self.0.into_owned()))
    }
}

/// Checks text that is compared with keys (a prefix, a page cursor): the
/// key rules, except that a prefix may be empty.
///
/// # Errors
/// [`KeyError`] naming the rule `text` breaks.
pub fn check_key_text(text: &str, may_be_empty: bool) -> Result<(), KeyError> {
    if text.is_empty() && !may_be_empty {
        return Err(KeyError::Empty);
    }
    // Bytes bound characters from above: most keys skip the count.
    if text.len() > MAX_KEY_CHARS && text.chars().count() > MAX_KEY_CHARS {
        return Err(KeyError::TooLong);
    }
    if text.as_bytes().contains(&0) {
        return Err(KeyError::Nul);
    }
    Ok(())
}

impl Deref for CounterKey<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CounterKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_contract() {
        assert_eq!(CounterKey::parse("").unwrap_err(), KeyError::Empty);
        assert!(CounterKey::parse("é".repeat(255)).is_ok());
        assert_eq!(
            CounterKey::parse("é".repeat(256)).unwrap_err(),
            KeyError::TooLong
        );
        assert_eq!(CounterKey::parse("a\0b").unwrap_err(), KeyError::Nul);
        assert_eq!(
            CounterKey::parse("page:/home?x=1 'quoted'")
                .expect("valid")
                .as_str(),
            "page:/home?x=1 'quoted'"
        );
        assert!(check_key_text("", true).is_ok());
        assert_eq!(check_key_text("\0", true), Err(KeyError::Nul));
    }
}
