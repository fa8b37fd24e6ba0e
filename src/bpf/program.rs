//! The `kernel-least` program: a `BPF_PROG_TYPE_SK_REUSEPORT` program that the kernel runs
//! for each new connection (and, attached as `SELECT_OR_MIGRATE`, for each request queued on
//! a listener that closes). It reads the load array ([`super::layout`]), picks the present
//! slot with the fewest active connections (ties broken from a random starting slot, so
//! equal workers share evenly), reserves it with an atomic add, and selects that slot's
//! listener in the socket array with `bpf_sk_select_reuseport`. If the selection fails (the
//! master removed the slot in between) it gives the reservation back; with no present slot
//! it lets the kernel pick by hash. It always returns `SK_PASS`: a connection is never
//! dropped here.

use super::asm::{Alu, Asm, Cond, R0, R1, R10, R2, R3, R4, R5, R6, R7, R8, R9};
use super::layout::{self, MAX_SLOTS};

const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_GET_PRANDOM_U32: i32 = 7;
const HELPER_SK_SELECT_REUSEPORT: i32 = 82;
const SK_PASS: i32 = 1;
/// Bits of a slot's rank, and of its index, in the compared key
/// (`load << 2·INDEX_BITS | rank << INDEX_BITS | slot`). The index rides in the key, not in
/// a register set to a constant per slot, so the verifier sees one unknown value after the
/// scan instead of one state per slot it could have picked.
const INDEX_BITS: i32 = 8;
const _: () = assert!(MAX_SLOTS <= 1 << INDEX_BITS && MAX_SLOTS.is_power_of_two());

/// log2 of a slot's bytes in the load array: slot i's words start at i << SLOT_SHIFT.
const SLOT_SHIFT: i32 = (layout::SLOT_WORDS * 8).trailing_zeros() as i32;

/// Byte offset of a word of the load array.
fn at(word: usize) -> i16 {
    (word * 8) as i16
}

/// The program's instructions, for the load array `loads` and the socket array `sockets`
/// (map fds, resolved by the kernel at load time).
pub(crate) fn least_loaded(loads: i32, sockets: i32) -> Vec<[u8; 8]> {
    let mut asm = Asm::default();
    let pass = asm.label();
    let done = asm.label();
    prologue(&mut asm, loads, &[-8], pass);
    // r4 = the random starting slot, r4 < r5.
    asm.load_w(R4, R10, -8)
        .alu_reg(Alu::Mod, R4, R5)
        // r7 = the best key so far: none.
        .alu_imm(Alu::Mov, R7, -1)
        .alu_imm(Alu::Rsh, R7, 1);
    for slot in 0..MAX_SLOTS {
        scan_slot(&mut asm, slot, done);
    }
    // r8 = the picked slot, the key's low byte, through a one-byte stack slot: the verifier
    // tracks no value through a partial write, so the bounds check below is all it knows of
    // r8, and the scan's branches collapse into one state.
    asm.place(done)
        .alu_reg(Alu::Mov, R1, R7)
        .alu_imm(Alu::Add, R1, 1)
        .alu_imm(Alu::Rsh, R1, 63)
        .jump_imm(Cond::Ne, R1, 0, pass)
        .store_b(R10, -9, R7)
        .load_b(R8, R10, -9);
    reserve_and_select(&mut asm, sockets, pass);
    asm.place(pass).alu_imm(Alu::Mov, R0, SK_PASS).exit();
    asm.finish()
        .expect("every label of the program is placed and near")
}

/// Compares slot `slot` with the best so far, without a branch but the early exit (a branch
/// per comparison would give the verifier a state per path: 2^64 of them). key = load << 16
/// | rank << 8 | slot, load clamped to [0, 2^47), rank = (slot − start) mod n, so that among
/// equal loads the slot nearest after the random start wins; an absent slot's key (and
/// the best before any) is 2^63 − 1, above every present slot's. All keys are below 2^63, so the sign of a difference orders two keys.
fn scan_slot(asm: &mut Asm, slot: usize, done: super::asm::Label) {
    let i = slot as i32;
    asm.jump_imm(Cond::Le, R5, i, done)
        // r1 = 0 if present (the word is 1), NONE if absent (0).
        .load_dw(R1, R9, at(layout::present_word(slot)))
        .alu_imm(Alu::Sub, R1, 1)
        .alu_imm(Alu::Rsh, R1, 1)
        // r2 = max(load, 0) << 16, below 2^63.
        .load_dw(R2, R9, at(layout::load_word(slot)))
        .alu_reg(Alu::Mov, R3, R2)
        .alu_imm(Alu::Arsh, R3, 63)
        .alu_imm(Alu::Xor, R3, -1)
        .alu_reg(Alu::And, R2, R3)
        .alu_imm(Alu::Lsh, R2, 2 * INDEX_BITS + 1)
        .alu_imm(Alu::Rsh, R2, 1)
        // r3 = slot + n − start, in [1, 2n); minus n if ≥ n: the rank.
        .alu_reg(Alu::Mov, R3, R5)
        .alu_imm(Alu::Add, R3, i)
        .alu_reg(Alu::Sub, R3, R4)
        .alu_reg(Alu::Mov, R0, R5)
        .alu_imm(Alu::Sub, R0, 1)
        .alu_reg(Alu::Sub, R0, R3)
        .alu_imm(Alu::Rsh, R0, 63)
        .alu_reg(Alu::Mul, R0, R5)
        .alu_reg(Alu::Sub, R3, R0)
        // r2 = the key.
        .alu_imm(Alu::Lsh, R3, INDEX_BITS)
        .alu_reg(Alu::Or, R2, R3)
        .alu_imm(Alu::Or, R2, i)
        .alu_reg(Alu::Or, R2, R1)
        // r7 = min(r7, r2): r3 = all ones if r2 < r7.
        .alu_reg(Alu::Mov, R3, R2)
        .alu_reg(Alu::Sub, R3, R7)
        .alu_imm(Alu::Rsh, R3, 63)
        .alu_imm(Alu::Neg, R3, 0)
        .alu_reg(Alu::Mov, R0, R2)
        .alu_reg(Alu::Xor, R0, R7)
        .alu_reg(Alu::And, R0, R3)
        .alu_reg(Alu::Xor, R7, R0);
}

/// The `kernel-p2c` program, for the same maps: two distinct slots at random (one if there
/// is one), the less loaded of the two present ones, reserved and selected as
/// [`least_loaded`] does. Constant work per connection whatever the number of slots, and
/// less herding than an exact least when many SYNs arrive at once on different CPUs (they
/// all read the same loads before any reservation lands).
pub(crate) fn two_choices(loads: i32, sockets: i32) -> Vec<[u8; 8]> {
    let mut asm = Asm::default();
    let pass = asm.label();
    let select = asm.label();
    let take_b = asm.label();
    let b_if_present = asm.label();
    let distinct = asm.label();
    prologue(&mut asm, loads, &[-8, -12], pass);
    // r7 = a, r8 = b, both < r5, distinct where r5 > 1.
    asm.load_w(R7, R10, -8)
        .alu_reg(Alu::Mod, R7, R5)
        .load_w(R8, R10, -12)
        .alu_reg(Alu::Mod, R8, R5)
        .alu_reg(Alu::Mov, R1, R8)
        .alu_reg(Alu::Xor, R1, R7)
        .jump_imm(Cond::Ne, R1, 0, distinct)
        .alu_imm(Alu::Add, R8, 1)
        .alu_reg(Alu::Mod, R8, R5);
    // Bounds the verifier can see, then r3 = &slot a's words, r4 = &slot b's.
    asm.place(distinct)
        .jump_imm(Cond::Ge, R7, MAX_SLOTS as i32, pass)
        .jump_imm(Cond::Ge, R8, MAX_SLOTS as i32, pass);
    slot_address(&mut asm, R3, R7);
    slot_address(&mut asm, R4, R8);
    // a absent: b if present, else let the kernel hash.
    asm.load_dw(R1, R3, at(layout::present_word(0)))
        .jump_imm(Cond::Eq, R1, 0, b_if_present)
        // b absent: a.
        .load_dw(R2, R4, at(layout::present_word(0)))
        .jump_imm(Cond::Eq, R2, 0, select)
        // Both present: b if load(b) < load(a) (signed; loads are far from overflow).
        .load_dw(R1, R3, at(layout::load_word(0)))
        .load_dw(R2, R4, at(layout::load_word(0)))
        .alu_reg(Alu::Sub, R2, R1)
        .alu_imm(Alu::Rsh, R2, 63)
        .jump_imm(Cond::Ne, R2, 0, take_b)
        .goto(select);
    asm.place(b_if_present)
        .load_dw(R2, R4, at(layout::present_word(0)))
        .jump_imm(Cond::Eq, R2, 0, pass);
    asm.place(take_b).alu_reg(Alu::Mov, R7, R8);
    // r8 = the pick, then as least_loaded.
    asm.place(select).alu_reg(Alu::Mov, R8, R7);
    reserve_and_select(&mut asm, sockets, pass);
    asm.place(pass).alu_imm(Alu::Mov, R0, SK_PASS).exit();
    asm.finish()
        .expect("every label of the program is placed and near")
}

/// What both programs start with: r6 = ctx; a random u32 parked at each of `randoms` (stack
/// offsets: calls clobber r1–r5); r9 = &loads[0], the one element; r5 = the slots in use,
/// at most [`MAX_SLOTS`]. With no element or no slot, on to `pass`.
fn prologue(asm: &mut Asm, loads: i32, randoms: &[i16], pass: super::asm::Label) {
    asm.alu_reg(Alu::Mov, R6, R1);
    for &offset in randoms {
        asm.call(HELPER_GET_PRANDOM_U32).store_w(R10, offset, R0);
    }
    asm.store_w_imm(R10, -4, 0)
        .load_map_fd(R1, loads)
        .alu_reg(Alu::Mov, R2, R10)
        .alu_imm(Alu::Add, R2, -4)
        .call(HELPER_MAP_LOOKUP_ELEM)
        .jump_imm(Cond::Eq, R0, 0, pass)
        .alu_reg(Alu::Mov, R9, R0)
        .load_dw(R5, R9, at(layout::SLOTS_WORD))
        .jump_imm(Cond::Eq, R5, 0, pass)
        .jump_imm(Cond::Ge, R5, MAX_SLOTS as i32 + 1, pass);
}

/// `dst` = the address of slot `index`'s words (`index` checked below [`MAX_SLOTS`]).
fn slot_address(asm: &mut Asm, dst: super::asm::Reg, index: super::asm::Reg) {
    asm.alu_reg(Alu::Mov, dst, index)
        .alu_imm(Alu::Lsh, dst, SLOT_SHIFT)
        .alu_reg(Alu::Add, dst, R9);
}

/// Adds 1 to slot r8's load, selects its listener; on failure takes the 1 back.
fn reserve_and_select(asm: &mut Asm, sockets: i32, pass: super::asm::Label) {
    let load = at(layout::load_word(0));
    asm.jump_imm(Cond::Ge, R8, MAX_SLOTS as i32, pass);
    slot_address(asm, R1, R8);
    asm.alu_imm(Alu::Mov, R2, 1)
        .atomic_add_dw(R1, load, R2)
        .store_w(R10, -4, R8)
        .alu_reg(Alu::Mov, R1, R6)
        .load_map_fd(R2, sockets)
        .alu_reg(Alu::Mov, R3, R10)
        .alu_imm(Alu::Add, R3, -4)
        .alu_imm(Alu::Mov, R4, 0)
        .call(HELPER_SK_SELECT_REUSEPORT)
        .jump_imm(Cond::Eq, R0, 0, pass)
        .jump_imm(Cond::Ge, R8, MAX_SLOTS as i32, pass);
    slot_address(asm, R1, R8);
    asm.alu_imm(Alu::Mov, R2, -1).atomic_add_dw(R1, load, R2);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_programs_fit_the_kernel_s_limits() {
        for insns in [least_loaded(3, 4), two_choices(3, 4)] {
            // 4096 is the limit for unprivileged programs; these need CAP_BPF anyway.
            assert!(insns.len() < 4096, "{} instructions", insns.len());
            let last = insns.last().unwrap();
            assert_eq!(last[0], 0x95, "ends with exit");
        }
    }
}
