//! The load array's layout, shared by the program, the master and the workers (and stated
//! in `docs/protocol.md`): one element of [`VALUE_LEN`] bytes, as 64-bit words. Word
//! [`SLOTS_WORD`] is the number of slots the program scans (written by the master); each
//! slot has a cache line of its own (so workers on different CPUs do not share one), its
//! first word the slot's active connections (a signed count: the program adds 1 when it
//! picks the slot, a worker subtracts 1 when a connection finishes), its second 1 while the
//! slot is in the socket array.

/// The most worker slots `kernel-least` takes (the program scans them unrolled).
pub(crate) const MAX_SLOTS: usize = 64;
/// The word holding how many slots the program scans.
pub(crate) const SLOTS_WORD: usize = 0;
/// Words before slot 0's: the header's cache line.
pub(crate) const HEADER_WORDS: usize = 8;
/// Words per slot: one cache line.
pub(crate) const SLOT_WORDS: usize = 8;
/// Bytes of the array's one value.
pub(crate) const VALUE_LEN: usize = 8 * (HEADER_WORDS + MAX_SLOTS * SLOT_WORDS);

/// The word of slot `slot`'s active connections.
pub(crate) const fn load_word(slot: usize) -> usize {
    HEADER_WORDS + slot * SLOT_WORDS
}

/// The word that is 1 while slot `slot` is in the socket array.
pub(crate) const fn present_word(slot: usize) -> usize {
    load_word(slot) + 1
}

const _: () = assert!((SLOT_WORDS * 8).is_power_of_two());
const _: () = assert!(
    VALUE_LEN < i16::MAX as usize,
    "the program addresses words with 16-bit offsets"
);
