//! The body of a journal message: the increments of one group, summed per
//! key, and the group's requests that carried an `Idempotency-Key`, each
//! kept whole. Binary, because every message is stored and read once more.
//!
//! Version 1 (no keyed request): a version byte, then per item the key's
//! length (LEB128), its UTF-8 bytes and the delta (zigzag LEB128).
//! Version 2: the version byte, the number of plain items (LEB128), those
//! items, then per keyed request its key (length and bytes), its fingerprint
//! (zigzag LEB128), its number of items and those items.

use crate::batch::Keyed;

/// First byte of a message without keyed requests (the common case).
const VERSION: u8 = 1;
/// First byte of a message with keyed requests.
const VERSION_KEYED: u8 = 2;

/// A decoded body: plain items borrowed, keyed requests owned (they go
/// whole into the batch).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Message<'a> {
    pub items: Vec<(&'a str, i64)>,
    pub keyed: Vec<Keyed>,
}

/// Why a message body could not be read. Such a message is skipped and
/// counted; it was not written by this version of the service.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("unknown message version {0}")]
    Version(u8),
    #[error("the message ends inside an item")]
    Truncated,
    #[error("a key is not UTF-8")]
    NotUtf8,
    #[error("the message holds no increment")]
    Empty,
    /// A key the service would have refused at its door: applying it would
    /// fail the database write (too long for its column, NUL) every time.
    #[error("a counter key {0}")]
    Key(crate::key::KeyError),
    #[error("an Idempotency-Key is not one the service takes: {0}")]
    IdempotencyKey(crate::idempotency::KeyError),
}

/// Appends the encoding of `items` to `out` (cleared first).
pub fn encode<'a>(items: impl IntoIterator<Item = (&'a str, i64)>, out: &mut Vec<u8>) {
    out.clear();
    out.push(VERSION);
    for (key, delta) in items {
        put_item(out, key, delta);
    }
}

/// Appends the encoding of `items` and `keyed` to `out` (cleared first):
/// version 1 when `keyed` is empty.
pub fn encode_message<'a>(
    items: impl ExactSizeIterator<Item = (&'a str, i64)>,
    keyed: &[Keyed],
    out: &mut Vec<u8>,
) {
    if keyed.is_empty() {
        return encode(items, out);
    }
    out.clear();
    out.push(VERSION_KEYED);
    put_varint(out, items.len() as u64);
    for (key, delta) in items {
        put_item(out, key, delta);
    }
    for request in keyed {
        put_varint(out, request.key.len() as u64);
        out.extend_from_slice(request.key.as_bytes());
        put_varint(out, zigzag(request.fingerprint));
        put_varint(out, request.items.len() as u64);
        for (key, delta) in &request.items {
            put_item(out, key, *delta);
        }
    }
}

/// Bytes one keyed request takes at most, for sizing messages.
pub fn max_keyed_len(request: &Keyed) -> usize {
    request.key.len()
        + 30
        + request
            .items
            .iter()
            .map(|(key, _)| max_item_len(key))
            .sum::<usize>()
}

fn put_item(out: &mut Vec<u8>, key: &str, delta: i64) {
    put_varint(out, key.len() as u64);
    out.extend_from_slice(key.as_bytes());
    put_varint(out, zigzag(delta));
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// Bytes one item takes at most, for sizing messages.
pub fn max_item_len(key: &str) -> usize {
    key.len() + 10 + 10
}

/// The items and keyed requests of a message body, plain keys borrowed.
///
/// # Errors
/// [`CodecError`] for a body this version did not write.
pub fn decode(body: &[u8]) -> Result<Message<'_>, CodecError> {
    let (&version, mut rest) = body.split_first().ok_or(CodecError::Truncated)?;
    let mut message = Message::default();
    match version {
        VERSION => {
            while !rest.is_empty() {
                message.items.push(take_item(&mut rest)?);
            }
        }
        VERSION_KEYED => {
            let plain = take_varint(&mut rest)?;
            for _ in 0..plain {
                message.items.push(take_item(&mut rest)?);
            }
            while !rest.is_empty() {
                let key = take_str(&mut rest)?;
                crate::idempotency::check_key(key.as_bytes())
                    .map_err(CodecError::IdempotencyKey)?;
                let key = key.to_owned();
                let fingerprint = unzigzag(take_varint(&mut rest)?);
                let count = take_varint(&mut rest)?;
                let mut items = Vec::new();
                for _ in 0..count {
                    let (item, delta) = take_item(&mut rest)?;
                    items.push((item.to_owned(), delta));
                }
                if items.is_empty() {
                    return Err(CodecError::Empty);
                }
                message.keyed.push(Keyed {
                    key,
                    fingerprint,
                    items,
                    taken_at: None,
                });
            }
        }
        other => return Err(CodecError::Version(other)),
    }
    if message.items.is_empty() && message.keyed.is_empty() {
        return Err(CodecError::Empty);
    }
    Ok(message)
}

fn take_str<'a>(rest: &mut &'a [u8]) -> Result<&'a str, CodecError> {
    let len = usize::try_from(take_varint(rest)?).map_err(|_| CodecError::Truncated)?;
    if rest.len() < len {
        return Err(CodecError::Truncated);
    }
    let (text, tail) = rest.split_at(len);
    *rest = tail;
    std::str::from_utf8(text).map_err(|_| CodecError::NotUtf8)
}

fn take_item<'a>(rest: &mut &'a [u8]) -> Result<(&'a str, i64), CodecError> {
    let key = take_str(rest)?;
    crate::key::check_key_text(key, false).map_err(CodecError::Key)?;
    let delta = unzigzag(take_varint(rest)?);
    Ok((key, delta))
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn take_varint(rest: &mut &[u8]) -> Result<u64, CodecError> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&byte, tail) = rest.split_first().ok_or(CodecError::Truncated)?;
        *rest = tail;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(CodecError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_survive_the_round_trip() {
        let long = "ключ".repeat(63);
        let items = vec![
            ("page:home", 1),
            ("ключ", -1),
            ("max", i64::MAX),
            ("min", i64::MIN),
            (long.as_str(), 12_345),
        ];
        let mut body = Vec::new();
        encode(items.iter().copied(), &mut body);
        assert!(body.len() <= 1 + items.iter().map(|(k, _)| max_item_len(k)).sum::<usize>());
        assert_eq!(decode(&body).unwrap().items, items);
        assert!(decode(&body).unwrap().keyed.is_empty());
    }

    #[test]
    fn keyed_requests_survive_the_round_trip() {
        let keyed = vec![
            Keyed {
                key: "order-17".to_owned(),
                fingerprint: i64::MIN,
                items: vec![("a".to_owned(), 3), ("b".to_owned(), -1)],
                taken_at: None,
            },
            Keyed {
                key: "k".repeat(255),
                fingerprint: 42,
                items: vec![("a".to_owned(), i64::MAX)],
                taken_at: None,
            },
        ];
        let plain = [("a", 1), ("c", -7)];
        let mut body = Vec::new();
        encode_message(plain.iter().copied(), &keyed, &mut body);
        assert!(
            body.len()
                <= 1 + 10 + 2 * max_item_len("a") + keyed.iter().map(max_keyed_len).sum::<usize>()
        );
        let message = decode(&body).unwrap();
        assert_eq!(message.items, plain);
        assert_eq!(message.keyed, keyed);
        encode_message(std::iter::empty(), &keyed[..1], &mut body);
        let message = decode(&body).unwrap();
        assert!(message.items.is_empty());
        assert_eq!(message.keyed, keyed[..1]);
        // Without keyed requests: version 1, as before.
        encode_message(plain.iter().copied(), &[], &mut body);
        assert_eq!(body[0], VERSION);
        assert_eq!(decode(&[VERSION_KEYED, 0]), Err(CodecError::Empty));
        assert_eq!(
            decode(&[VERSION_KEYED, 0, 1, b'x', 0, 0]),
            Err(CodecError::Empty)
        );
    }

    #[test]
    fn foreign_bodies_are_refused() {
        assert_eq!(decode(b""), Err(CodecError::Truncated));
        assert_eq!(decode(&[VERSION]), Err(CodecError::Empty));
        assert_eq!(decode(&[9, 1, b'a', 2]), Err(CodecError::Version(9)));
        assert_eq!(decode(&[VERSION, 5, b'a']), Err(CodecError::Truncated));
        assert_eq!(decode(&[VERSION, 1, 0xff, 2]), Err(CodecError::NotUtf8));
        assert_eq!(
            decode(&[VERSION, 1, b'a', 0x80]),
            Err(CodecError::Truncated)
        );
    }

    /// Keys the service refuses at its door are refused in a message too:
    /// another publisher's over-long key failed every flush for good.
    #[test]
    fn keys_the_service_would_refuse_are_refused() {
        let mut body = Vec::new();
        for (key, error) in [
            ("k".repeat(256), crate::key::KeyError::TooLong),
            (String::new(), crate::key::KeyError::Empty),
            ("a\0b".to_owned(), crate::key::KeyError::Nul),
        ] {
            encode([(key.as_str(), 1)], &mut body);
            assert_eq!(decode(&body), Err(CodecError::Key(error)));
        }
        for key in ["k".repeat(256), "é".to_owned(), String::new()] {
            let keyed = [Keyed {
                key,
                fingerprint: 1,
                items: vec![("a".to_owned(), 1)],
                taken_at: None,
            }];
            encode_message(std::iter::empty(), &keyed, &mut body);
            assert!(matches!(decode(&body), Err(CodecError::IdempotencyKey(_))));
        }
    }
}
