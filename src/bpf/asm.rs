//! A small eBPF assembler: the instructions the `kernel-least` program needs, encoded as the
//! kernel reads them (`struct bpf_insn`: opcode, dst/src registers, 16-bit offset, 32-bit
//! immediate), with forward labels patched at the end. Pure: it builds bytes, the master
//! loads them through `sys::bpf`.

/// A register: r0 (return value), r1–r5 (arguments, clobbered by calls), r6–r9 (kept across
/// calls), r10 (frame pointer, read-only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reg(pub u8);

pub(crate) const R0: Reg = Reg(0);
pub(crate) const R1: Reg = Reg(1);
pub(crate) const R2: Reg = Reg(2);
pub(crate) const R3: Reg = Reg(3);
pub(crate) const R4: Reg = Reg(4);
pub(crate) const R5: Reg = Reg(5);
pub(crate) const R6: Reg = Reg(6);
pub(crate) const R7: Reg = Reg(7);
pub(crate) const R8: Reg = Reg(8);
pub(crate) const R9: Reg = Reg(9);
pub(crate) const R10: Reg = Reg(10);

// Instruction classes.
const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const ST: u8 = 0x02;
const STX: u8 = 0x03;
const JMP: u8 = 0x05;
const ALU64: u8 = 0x07;
// Sizes and modes.
const W: u8 = 0x00;
const B: u8 = 0x10;
const DW: u8 = 0x18;
const IMM: u8 = 0x00;
const MEM: u8 = 0x60;
const ATOMIC: u8 = 0xc0;
// Sources.
const K: u8 = 0x00;
const X: u8 = 0x08;

/// An ALU operation.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Alu {
    Add = 0x00,
    Sub = 0x10,
    Or = 0x40,
    And = 0x50,
    Mul = 0x20,
    Lsh = 0x60,
    Rsh = 0x70,
    Neg = 0x80,
    Mod = 0x90,
    Xor = 0xa0,
    Mov = 0xb0,
    Arsh = 0xc0,
}

/// A jump condition (unsigned comparisons unless `S`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Cond {
    Eq = 0x10,
    Ge = 0x30,
    Ne = 0x50,
    Le = 0xb0,
}

/// A place in the program that jumps may name before it is placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Label(usize);

/// A program being assembled.
#[derive(Debug, Default)]
pub(crate) struct Asm {
    insns: Vec<[u8; 8]>,
    labels: Vec<Option<usize>>,
    /// (instruction index, label) of each jump to patch.
    jumps: Vec<(usize, Label)>,
}

fn encode(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> [u8; 8] {
    let mut insn = [0u8; 8];
    insn[0] = code;
    // Little-endian bitfields: dst_reg in the low nibble.
    insn[1] = (dst.0 & 0x0f) | (src.0 << 4);
    insn[2..4].copy_from_slice(&off.to_le_bytes());
    insn[4..8].copy_from_slice(&imm.to_le_bytes());
    insn
}

impl Asm {
    fn push(&mut self, insn: [u8; 8]) -> &mut Self {
        self.insns.push(insn);
        self
    }

    /// A new label, placed later with [`Asm::place`].
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Places `label` at the next instruction.
    pub fn place(&mut self, label: Label) -> &mut Self {
        self.labels[label.0] = Some(self.insns.len());
        self
    }

    /// `dst op= imm` (64-bit).
    pub fn alu_imm(&mut self, op: Alu, dst: Reg, imm: i32) -> &mut Self {
        self.push(encode(ALU64 | K | op as u8, dst, R0, 0, imm))
    }

    /// `dst op= src` (64-bit).
    pub fn alu_reg(&mut self, op: Alu, dst: Reg, src: Reg) -> &mut Self {
        self.push(encode(ALU64 | X | op as u8, dst, src, 0, 0))
    }

    /// `dst = *(u64 *)(src + off)`.
    pub fn load_dw(&mut self, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.push(encode(LDX | MEM | DW, dst, src, off, 0))
    }

    /// `dst = *(u32 *)(src + off)`.
    pub fn load_w(&mut self, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.push(encode(LDX | MEM | W, dst, src, off, 0))
    }

    /// `dst = *(u8 *)(src + off)`.
    pub fn load_b(&mut self, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.push(encode(LDX | MEM | B, dst, src, off, 0))
    }

    /// `*(u8 *)(dst + off) = src`.
    pub fn store_b(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.push(encode(STX | MEM | B, dst, src, off, 0))
    }

    /// `*(u32 *)(dst + off) = src`.
    pub fn store_w(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.push(encode(STX | MEM | W, dst, src, off, 0))
    }

    /// `*(u32 *)(dst + off) = imm`.
    pub fn store_w_imm(&mut self, dst: Reg, off: i16, imm: i32) -> &mut Self {
        self.push(encode(ST | MEM | W, dst, R0, off, imm))
    }

    /// `lock *(u64 *)(dst + off) += src`.
    pub fn atomic_add_dw(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.push(encode(STX | ATOMIC | DW, dst, src, off, Alu::Add as i32))
    }

    /// `dst = map` by fd: the two-instruction `ld_imm64` with `BPF_PSEUDO_MAP_FD`.
    pub fn load_map_fd(&mut self, dst: Reg, fd: i32) -> &mut Self {
        self.push(encode(LD | IMM | DW, dst, Reg(1), 0, fd))
            .push(encode(0, R0, R0, 0, 0))
    }

    /// `call helper`: arguments in r1–r5, result in r0; r1–r5 are clobbered.
    pub fn call(&mut self, helper: i32) -> &mut Self {
        self.push(encode(JMP | 0x80, R0, R0, 0, helper))
    }

    /// `return r0`.
    pub fn exit(&mut self) -> &mut Self {
        self.push(encode(JMP | 0x90, R0, R0, 0, 0))
    }

    /// `if dst cond imm goto label`.
    pub fn jump_imm(&mut self, cond: Cond, dst: Reg, imm: i32, to: Label) -> &mut Self {
        self.jumps.push((self.insns.len(), to));
        self.push(encode(JMP | K | cond as u8, dst, R0, 0, imm))
    }

    /// `goto label`.
    pub fn goto(&mut self, to: Label) -> &mut Self {
        self.jumps.push((self.insns.len(), to));
        self.push(encode(JMP, R0, R0, 0, 0))
    }

    /// The instructions, every jump patched. Fails on a label never placed or a jump out of
    /// the 16-bit range.
    pub fn finish(mut self) -> Result<Vec<[u8; 8]>, String> {
        for &(at, label) in &self.jumps {
            let target = self.labels[label.0].ok_or("a jump to a label never placed")?;
            let off = i16::try_from(target as i64 - at as i64 - 1)
                .map_err(|_| "a jump farther than 32767 instructions".to_string())?;
            self.insns[at][2..4].copy_from_slice(&off.to_le_bytes());
        }
        Ok(self.insns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_as_the_kernel_reads_them() {
        let mut asm = Asm::default();
        asm.alu_reg(Alu::Mov, R6, R1)
            .alu_imm(Alu::Mov, R0, 1)
            .load_dw(R1, R9, 72)
            .atomic_add_dw(R1, 64, R2)
            .load_map_fd(R1, 7)
            .call(82)
            .exit();
        let insns = asm.finish().unwrap();
        assert_eq!(insns[0], [0xbf, 0x16, 0, 0, 0, 0, 0, 0]); // r6 = r1
        assert_eq!(insns[1], [0xb7, 0x00, 0, 0, 1, 0, 0, 0]); // r0 = 1
        assert_eq!(insns[2], [0x79, 0x91, 72, 0, 0, 0, 0, 0]); // r1 = *(u64 *)(r9 + 72)
        assert_eq!(insns[3], [0xdb, 0x21, 64, 0, 0, 0, 0, 0]); // lock *(u64 *)(r1 + 64) += r2
        assert_eq!(insns[4], [0x18, 0x11, 0, 0, 7, 0, 0, 0]); // r1 = map fd 7
        assert_eq!(insns[5], [0; 8]);
        assert_eq!(insns[6], [0x85, 0, 0, 0, 82, 0, 0, 0]); // call 82
        assert_eq!(insns[7], [0x95, 0, 0, 0, 0, 0, 0, 0]); // exit
    }

    #[test]
    fn jumps_land_on_their_labels_both_ways() {
        let mut asm = Asm::default();
        let ahead = asm.label();
        let back = asm.label();
        asm.place(back)
            .jump_imm(Cond::Eq, R0, 0, ahead)
            .alu_imm(Alu::Add, R0, 1)
            .jump_imm(Cond::Ge, R0, 9, back)
            .goto(ahead)
            .place(ahead)
            .exit();
        let insns = asm.finish().unwrap();
        assert_eq!(i16::from_le_bytes([insns[0][2], insns[0][3]]), 3);
        assert_eq!(i16::from_le_bytes([insns[2][2], insns[2][3]]), -3);
        assert_eq!(i16::from_le_bytes([insns[3][2], insns[3][3]]), 0);
        assert_eq!(insns[0][0], 0x15); // jeq imm
        assert_eq!(insns[2][0], 0x35); // jge imm
        assert_eq!(insns[3][0], 0x05); // ja
    }

    #[test]
    fn a_label_never_placed_is_an_error() {
        let mut asm = Asm::default();
        let nowhere = asm.label();
        asm.jump_imm(Cond::Eq, R0, 0, nowhere).exit();
        assert!(asm.finish().is_err());
    }
}
