//! The body of a journal message: the increments of one group, summed per
//! key. Binary, because every message is stored and read once more: a
//! version byte, then per item the key's length (LEB128), its UTF-8 bytes and
//! the delta (zigzag LEB128).

/// First byte of every message this version writes.
const VERSION: u8 = 1;

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
}

/// Appends the encoding of `items` to `out` (cleared first).
pub fn encode<'a>(items: impl IntoIterator<Item = (&'a str, i64)>, out: &mut Vec<u8>) {
    out.clear();
    out.push(VERSION);
    for (key, delta) in items {
        put_varint(out, key.len() as u64);
        out.extend_from_slice(key.as_bytes());
        put_varint(out, ((delta << 1) ^ (delta >> 63)) as u64);
    }
}

/// Bytes one item takes at most, for sizing messages.
pub fn max_item_len(key: &str) -> usize {
    key.len() + 10 + 10
}

/// The items of a message body, keys borrowed.
///
/// # Errors
/// [`CodecError`] for a body this version did not write.
pub fn decode(body: &[u8]) -> Result<Vec<(&str, i64)>, CodecError> {
    let (&version, mut rest) = body.split_first().ok_or(CodecError::Truncated)?;
    if version != VERSION {
        return Err(CodecError::Version(version));
    }
    let mut items = Vec::new();
    while !rest.is_empty() {
        let len = usize::try_from(take_varint(&mut rest)?).map_err(|_| CodecError::Truncated)?;
        if rest.len() < len {
            return Err(CodecError::Truncated);
        }
        let (key, tail) = rest.split_at(len);
        rest = tail;
        let key = std::str::from_utf8(key).map_err(|_| CodecError::NotUtf8)?;
        let zigzag = take_varint(&mut rest)?;
        let delta = ((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64);
        items.push((key, delta));
    }
    if items.is_empty() {
        return Err(CodecError::Empty);
    }
    Ok(items)
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
        let long = "k".repeat(300);
        let items = vec![
            ("page:home", 1),
            ("", 0),
            ("ключ", -1),
            ("max", i64::MAX),
            ("min", i64::MIN),
            (long.as_str(), 12_345),
        ];
        let mut body = Vec::new();
        encode(items.iter().copied(), &mut body);
        assert!(body.len() <= 1 + items.iter().map(|(k, _)| max_item_len(k)).sum::<usize>());
        assert_eq!(decode(&body).unwrap(), items);
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
}
