//! `btf`: byte offsets of kernel struct fields, read from the kernel's own type information
//! (`/sys/kernel/btf/vmlinux`, the BPF Type Format).
//!
//! Our programs are Rust, which has no CO-RE field relocations, so a program that reads a kernel
//! struct is given the offsets by user space instead. This reads only what that needs: the type
//! section's structs, unions and the qualifiers between them. (aya parses BTF too, but keeps
//! struct members private; btf-rs is LGPL.) The format: a header, then records of 12 bytes
//! (name, info, size or type) each followed by kind-specific data, then a string section;
//! see the kernel's Documentation/bpf/btf.rst.

use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone, Copy)]
struct Member {
    name: u32,
    ty: u32,
    bit_offset: u32,
}

/// One type record's fixed part; its members are read from the blob when asked for.
#[derive(Debug, Clone, Copy)]
struct Type {
    name: u32,
    kind: u32,
    kind_flag: bool,
    vlen: usize,
    /// The referenced type, for typedefs and qualifiers.
    ty: u32,
    /// Where the kind-specific data starts in the blob.
    data: usize,
}

/// The kernel's types, enough to find field offsets: the blob (5.5 MB on this machine) and
/// where each type's record starts in it (4 bytes per type), nothing decoded ahead.
pub struct Btf {
    blob: Vec<u8>,
    /// Indexed by type id; id 0 is `void` (no record).
    records: Vec<u32>,
    strings: usize,
    strings_end: usize,
}

impl Type {
    fn at(data: &[u8], at: usize) -> Result<Type> {
        let info = u32_at(data, at + 4)?;
        Ok(Type {
            name: u32_at(data, at)?,
            kind: (info >> 24) & 0x1f,
            kind_flag: info >> 31 == 1,
            vlen: (info & 0xffff) as usize,
            ty: u32_at(data, at + 8)?,
            data: at + 12,
        })
    }
}

fn u32_at(data: &[u8], at: usize) -> Result<u32> {
    let bytes = data
        .get(at..at + 4)
        .ok_or_else(|| anyhow!("BTF truncated at byte {at}"))?;
    Ok(u32::from_le_bytes(bytes.try_into().unwrap()))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn kernel() -> Result<Btf> {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        let data = std::fs::read(path).with_context(|| {
            format!(
                "reading {}: this kernel was built without BTF (CONFIG_DEBUG_INFO_BTF)",
                path.display()
            )
        })?;
        Btf::parse(data).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn parse(blob: Vec<u8>) -> Result<Btf> {
        let data = &blob;
        let magic = data
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| anyhow!("BTF shorter than its header"))?;
        if magic != MAGIC {
            bail!("not little-endian BTF (magic {magic:#06x}, expected {MAGIC:#06x})");
        }
        let header_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let (strings, strings_end) = (header_len + str_off, header_len + str_off + str_len);
        if strings_end > data.len() {
            bail!("BTF string section out of bounds");
        }
        let (mut at, end) = (header_len + type_off, header_len + type_off + type_len);
        if end > data.len() {
            bail!("BTF type section out of bounds");
        }
        // Every record is at least 12 bytes: one allocation, no growth.
        let mut records = Vec::with_capacity(1 + type_len / 12);
        records.push(0);
        while at < end {
            let ty = Type::at(data, at)?;
            at = ty.data
                + match ty.kind {
                    KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                    KIND_ARRAY => 12,
                    KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * ty.vlen,
                    KIND_ENUM | KIND_FUNC_PROTO => 8 * ty.vlen,
                    KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST
                    | KIND_RESTRICT | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                    other => bail!("BTF type {} has unknown kind {other}", records.len()),
                };
            if at > end {
                bail!("BTF type {} runs past the type section", records.len());
            }
            records.push(ty.data as u32 - 12);
        }
        Ok(Btf {
            blob,
            records,
            strings,
            strings_end,
        })
    }

    /// Type `id`'s record; `None` for `void` and ids past the end.
    fn type_by_id(&self, id: u32) -> Option<Type> {
        match self.records.get(id as usize) {
            Some(&at) if id > 0 => Type::at(&self.blob, at as usize).ok(),
            _ => None,
        }
    }

    fn name(&self, offset: u32) -> &[u8] {
        let rest = self
            .blob
            .get(self.strings + offset as usize..self.strings_end)
            .unwrap_or_default();
        &rest[..rest.iter().position(|b| *b == 0).unwrap_or(rest.len())]
    }

    fn members(&self, aggregate: &Type) -> impl Iterator<Item = Member> + '_ {
        let (data, kind_flag) = (aggregate.data, aggregate.kind_flag);
        (0..aggregate.vlen).map(move |i| {
            let field = |k: usize| {
                let at = data + 12 * i + 4 * k;
                u32::from_le_bytes(self.blob[at..at + 4].try_into().unwrap())
            };
            let offset = field(2);
            Member {
                name: field(0),
                ty: field(1),
                // With the kind flag, the top 8 bits are a bitfield's size.
                bit_offset: if kind_flag {
                    offset & 0xff_ffff
                } else {
                    offset
                },
            }
        })
    }

    /// The struct or union a type id stands for, through typedefs and qualifiers.
    fn aggregate(&self, mut id: u32) -> Option<Type> {
        for _ in 0..16 {
            let ty = self.type_by_id(id)?;
            match ty.kind {
                KIND_STRUCT | KIND_UNION => return Some(ty),
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.ty
                }
                _ => return None,
            }
        }
        None
    }

    /// Bit offset and type of a named member, looking into anonymous structs and unions.
    fn member_bits(&self, aggregate: &Type, name: &str) -> Option<(u32, u32)> {
        for member in self.members(aggregate) {
            if self.name(member.name) == name.as_bytes() {
                return Some((member.bit_offset, member.ty));
            }
            if member.name == 0 {
                if let Some(inner) = self.aggregate(member.ty) {
                    if let Some((bits, ty)) = self.member_bits(&inner, name) {
                        return Some((member.bit_offset + bits, ty));
                    }
                }
            }
        }
        None
    }

    /// Byte offset of `path` (`["se", "sum_exec_runtime"]`) in `struct name`.
    pub fn offset_of(&self, name: &str, path: &[&str]) -> Result<u64> {
        let spelled = || format!("struct {name}.{}", path.join("."));
        let mut current = (1..self.records.len() as u32)
            .filter_map(|id| self.type_by_id(id))
            .find(|t| t.kind == KIND_STRUCT && self.name(t.name) == name.as_bytes())
            .ok_or_else(|| anyhow!("this kernel's BTF has no struct {name}"))?;
        let mut bits = 0u64;
        for (i, field) in path.iter().enumerate() {
            let (offset, ty) = self
                .member_bits(&current, field)
                .ok_or_else(|| anyhow!("this kernel's BTF has no {}", spelled()))?;
            bits += u64::from(offset);
            if i + 1 < path.len() {
                current = self
                    .aggregate(ty)
                    .ok_or_else(|| anyhow!("{}: {field} is not a struct", spelled()))?;
            }
        }
        if !bits.is_multiple_of(8) {
            bail!("{} is a bitfield", spelled());
        }
        Ok(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob by hand: `struct inner { u64 pad; u64 value; }` and
    /// `struct outer { u32 a; union { u32 b; struct inner in; }; }` (anonymous union at 8).
    fn sample() -> Vec<u8> {
        let strings = b"\0u64\0inner\0pad\0value\0outer\0a\0b\0in\0u32\0";
        let at = |s: &str| {
            let needle = format!("\0{s}\0");
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut types: Vec<u32> = Vec::new();
        let info = |kind: u32, vlen: u32| (kind << 24) | vlen;
        // 1: u64
        types.extend([at("u64"), info(KIND_INT, 0), 8, 64]);
        // 2: struct inner
        types.extend([at("inner"), info(KIND_STRUCT, 2), 16]);
        types.extend([at("pad"), 1, 0, at("value"), 1, 64]);
        // 3: u32
        types.extend([at("u32"), info(KIND_INT, 0), 4, 32]);
        // 4: anonymous union { u32 b; struct inner in; }
        types.extend([0, info(KIND_UNION, 2), 16]);
        types.extend([at("b"), 3, 0, at("in"), 2, 0]);
        // 5: struct outer
        types.extend([at("outer"), info(KIND_STRUCT, 2), 24]);
        types.extend([at("a"), 3, 0, 0, 4, 64]);
        let type_bytes: Vec<u8> = types.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut blob = Vec::new();
        blob.extend(MAGIC.to_le_bytes());
        blob.extend([1u8, 0]);
        for v in [
            24u32,
            0,
            type_bytes.len() as u32,
            type_bytes.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend(v.to_le_bytes());
        }
        blob.extend(type_bytes);
        blob.extend(strings);
        blob
    }

    #[test]
    fn offsets_through_anonymous_unions_and_nested_structs() {
        let btf = Btf::parse(sample()).unwrap();
        assert_eq!(btf.offset_of("outer", &["a"]).unwrap(), 0);
        assert_eq!(btf.offset_of("outer", &["b"]).unwrap(), 8);
        assert_eq!(btf.offset_of("outer", &["in", "value"]).unwrap(), 16);
        assert_eq!(btf.offset_of("inner", &["value"]).unwrap(), 8);
        let err = btf.offset_of("outer", &["in", "nope"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "this kernel's BTF has no struct outer.in.nope"
        );
        let err = btf.offset_of("outer", &["a", "x"]).unwrap_err();
        assert_eq!(err.to_string(), "struct outer.a.x: a is not a struct");
        assert!(btf.offset_of("missing", &["a"]).is_err());
    }

    #[test]
    fn refuses_what_is_not_btf() {
        let err = Btf::parse(vec![0u8; 32]).err().unwrap();
        assert!(
            err.to_string().starts_with("not little-endian BTF"),
            "{err}"
        );
        assert!(Btf::parse(vec![0x9f]).is_err());
    }

    #[test]
    fn finds_the_scheduler_runtime_in_this_kernel() {
        let Ok(btf) = Btf::kernel() else {
            eprintln!("no /sys/kernel/btf/vmlinux here");
            return;
        };
        let se = btf.offset_of("task_struct", &["se"]).unwrap();
        let runtime = btf
            .offset_of("task_struct", &["se", "sum_exec_runtime"])
            .unwrap();
        let within = btf
            .offset_of("sched_entity", &["sum_exec_runtime"])
            .unwrap();
        assert_eq!(runtime, se + within);
        assert_eq!(runtime % 8, 0);
        assert_eq!(
            btf.offset_of("task_struct", &["start_time"]).unwrap() % 8,
            0
        );
    }
}
