//! Pages: the cache's entries, each holding the slots of a few keys.
//!
//! moka's own entry costs about 260–290 bytes whatever it holds (its table
//! bucket, the `Arc`'d key, the value and entry info, the access- and
//! write-order nodes: measured in bench/PROFILE.md), more than a key's slot,
//! index pointer and dirty-list place together. So the cache holds pages,
//! not slots: a new key's slot joins the page open for new keys, and a page
//! enters the cache once, weighing its room. It leaves the cache whole
//! (size, TTL, invalidation), and every slot in it is sealed then, as a
//! single slot was: a page bounds its keys' life and count as an entry
//! bounded each key's.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

/// The slots of keys that entered the cache together.
pub(super) struct Page<V> {
    /// Weight of keys the page takes; what it weighs in the cache.
    room: u64,
    /// When the page was opened (its life in the cache began about then).
    opened: Instant,
    state: Mutex<PageState<V>>,
}

struct PageState<V> {
    slots: Vec<Arc<V>>,
    /// Weight of the keys of `slots`.
    used: u64,
    /// The page left the cache: its slots are sealed (or being sealed) and
    /// no slot may join it.
    sealed: bool,
}

/// What [`Page::join`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Join {
    Joined,
    /// The key is heavier than the room left; lighter keys may still join.
    NoRoom,
    /// No key may join: the page is full, sealed or too old.
    Closed,
}

impl<V> Page<V> {
    /// A page with room for keys weighing `room` in all, holding `slot`,
    /// whose key weighs `weight` (heavier than `room` when the page is made
    /// for that key alone).
    pub(super) fn holding(slot: &Arc<V>, weight: u64, room: u64) -> Self {
        let mut slots = Vec::with_capacity(usize::try_from(room.min(64)).unwrap_or(64));
        slots.push(Arc::clone(slot));
        Self {
            room,
            opened: Instant::now(),
            state: Mutex::new(PageState {
                slots,
                used: weight,
                sealed: false,
            }),
        }
    }

    /// What the page weighs in the cache: its room, used or not.
    pub(super) fn room(&self) -> u64 {
        self.room
    }

    /// Adds `slot`, whose key weighs `weight`, if the page is open to it.
    /// A page older than `max_age` is closed: a key that joined it would
    /// leave the cache with it sooner than its TTL's half.
    pub(super) fn join(&self, slot: &Arc<V>, weight: u64, max_age: Duration) -> Join {
        let mut state = self.state.lock();
        if state.sealed || state.used >= self.room || self.opened.elapsed() >= max_age {
            return Join::Closed;
        }
        if state.used + weight > self.room {
            return Join::NoRoom;
        }
        state.used += weight;
        state.slots.push(Arc::clone(slot));
        Join::Joined
    }

    /// Marks the page as gone from the cache and hands over its slots (for
    /// the caller to seal). Later calls return nothing.
    pub(super) fn seal(&self) -> Vec<Arc<V>> {
        let mut state = self.state.lock();
        state.sealed = true;
        std::mem::take(&mut state.slots)
    }

    /// The slots of a page still in the cache (for tests).
    #[cfg(test)]
    pub(super) fn slots(&self) -> Vec<Arc<V>> {
        self.state.lock().slots.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGE: Duration = Duration::from_secs(60);

    #[test]
    fn a_page_takes_keys_up_to_its_room_then_none_once_sealed() {
        let one = Arc::new(1);
        let page = Page::holding(&one, 1, 4);
        assert_eq!(page.join(&Arc::new(2), 2, AGE), Join::Joined);
        assert_eq!(
            page.join(&Arc::new(3), 2, AGE),
            Join::NoRoom,
            "5 units in a room of 4"
        );
        assert_eq!(page.join(&Arc::new(4), 1, AGE), Join::Joined);
        assert_eq!(page.join(&Arc::new(5), 1, AGE), Join::Closed, "full");
        let sealed = page.seal();
        assert_eq!(sealed.len(), 3);
        assert!(Arc::ptr_eq(&sealed[0], &one));
        assert!(page.seal().is_empty(), "sealed once");
        let page = Page::holding(&Arc::new(0), 1, 4);
        page.seal();
        assert_eq!(page.join(&Arc::new(6), 1, AGE), Join::Closed, "sealed");
    }

    #[test]
    fn a_page_made_for_a_key_heavier_than_its_room_holds_it_alone() {
        let page = Page::holding(&Arc::new(1), 9, 2);
        assert_eq!(page.slots().len(), 1);
        assert_eq!(page.join(&Arc::new(2), 1, AGE), Join::Closed);
    }

    #[test]
    fn an_old_page_is_closed() {
        let page = Page::holding(&Arc::new(1), 1, 4);
        assert_eq!(page.join(&Arc::new(2), 1, Duration::ZERO), Join::Closed);
    }
}
