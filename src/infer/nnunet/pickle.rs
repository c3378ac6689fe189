//! A restricted unpickler for the `data.pkl` of a `torch.save` checkpoint: it interprets
//! an allowlist of pickle opcodes into an inert [`Value`] tree and never imports or calls
//! anything. Python's own unpickler (what `torch.load(weights_only=False)`, and so nnU-Net,
//! uses) executes whatever callables the file names; here a callable is only a marker, and
//! the few combinations a checkpoint needs (`_rebuild_tensor_v2`, `OrderedDict()`,
//! `torch.device`, numpy scalars, `_codecs.encode`) are turned into plain data. Every other
//! opcode or global is refused, naming it and its byte offset.
//!
//! The opcodes are those Python's pickler writes at protocol 2 (torch.save's default),
//! plus the data-only framing and string opcodes of protocols 3-4 (`FRAME`, `MEMOIZE`,
//! `SHORT_BINUNICODE`, `BINBYTES`, `SHORT_BINBYTES`, `STACK_GLOBAL`) so that a file saved
//! with `pickle_protocol=4` reads too.
//!
//! A hostile file must not exhaust memory or the stack: the input size, the values created,
//! the memo, the nesting depth and the size of the resolved tree are bounded ([`Limits`]),
//! every length prefix is checked against the bytes that remain, and no operation is worse
//! than linear in the input (dict keys are not deduplicated while unpickling; [`Value::get`]
//! returns the last entry, as Python's later `SETITEM` would win).

use std::rc::Rc;

/// Bounds on what one pickle may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest pickle, in bytes.
    pub max_input: usize,
    /// Values created (each costs tens of bytes): bounds memory independently of sharing.
    pub max_items: usize,
    /// Largest memo index + 1 (Python's pickler numbers memo entries from 0).
    pub max_memo: usize,
    /// Nesting depth of marks while unpickling and of containers in the result.
    pub max_depth: usize,
    /// Nodes of the resolved tree (a value shared through the memo counts each time).
    pub max_nodes: usize,
}

impl Default for Limits {
    /// Far above any nnU-Net checkpoint (tens of kB of pickle, about 10^4 values, depth
    /// below 20), far below what would strain a worker.
    fn default() -> Self {
        Limits {
            max_input: 64 << 20,
            max_items: 4_000_000,
            max_memo: 1 << 20,
            max_depth: 256,
            max_nodes: 2_000_000,
        }
    }
}

/// Why a pickle was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PickleError {
    /// An opcode outside the allowlist (those that import, call or build objects, and the
    /// text-protocol ones a torch.save never writes).
    #[error("pickle offset {offset}: opcode {name} (0x{opcode:02x}) is not allowed (only inert data and torch's tensor records are read)")]
    Opcode {
        /// Byte offset of the opcode.
        offset: usize,
        /// The opcode byte.
        opcode: u8,
        /// Its name in Python's pickletools, or `unknown`.
        name: &'static str,
    },
    /// A global outside the allowlist.
    #[error("pickle offset {offset}: global {module}.{name} is not allowed (only torch tensor/storage records, torch.device, OrderedDict and numpy scalars are read)")]
    Global {
        /// Byte offset of the opcode.
        offset: usize,
        /// Module.
        module: String,
        /// Name.
        name: String,
    },
    /// The pickle ends inside an opcode or without `STOP`.
    #[error("pickle offset {offset}: truncated ({what})")]
    Truncated {
        /// Where the missing bytes start.
        offset: usize,
        /// What was being read.
        what: &'static str,
    },
    /// A bound of [`Limits`] was reached.
    #[error("pickle offset {offset}: more than {limit} {what}")]
    Limit {
        /// Byte offset of the opcode.
        offset: usize,
        /// Which bound.
        what: &'static str,
        /// Its value.
        limit: usize,
    },
    /// Opcodes that do not fit together (stack underflow, missing memo entry, wrong types).
    #[error("pickle offset {offset}: {opcode}: {why}")]
    Malformed {
        /// Byte offset of the opcode.
        offset: usize,
        /// Its name.
        opcode: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// Element type of a torch storage, from its class name (`torch.FloatStorage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    /// `FloatStorage`.
    F32,
    /// `DoubleStorage`.
    F64,
    /// `HalfStorage`.
    F16,
    /// `BFloat16Storage`.
    BF16,
    /// `LongStorage`.
    I64,
    /// `IntStorage`.
    I32,
    /// `ShortStorage`.
    I16,
    /// `CharStorage`.
    I8,
    /// `ByteStorage`.
    U8,
    /// `BoolStorage`.
    Bool,
}

impl StorageDtype {
    const ALL: [(&'static str, StorageDtype); 10] = [
        ("FloatStorage", StorageDtype::F32),
        ("DoubleStorage", StorageDtype::F64),
        ("HalfStorage", StorageDtype::F16),
        ("BFloat16Storage", StorageDtype::BF16),
        ("LongStorage", StorageDtype::I64),
        ("IntStorage", StorageDtype::I32),
        ("ShortStorage", StorageDtype::I16),
        ("CharStorage", StorageDtype::I8),
        ("ByteStorage", StorageDtype::U8),
        ("BoolStorage", StorageDtype::Bool),
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StorageDtype::F64 | StorageDtype::I64 => 8,
            StorageDtype::F32 | StorageDtype::I32 => 4,
            StorageDtype::F16 | StorageDtype::BF16 | StorageDtype::I16 => 2,
            StorageDtype::I8 | StorageDtype::U8 | StorageDtype::Bool => 1,
        }
    }

    /// The storage class name, for messages.
    pub fn class_name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, d)| *d == self)
            .map_or("?", |(n, _)| n)
    }
}

/// A storage named by a tensor record (torch.save's persistent id
/// `('storage', <class>, key, location, numel)`): its bytes are the archive entry
/// `<prefix>/data/<key>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    /// Archive key.
    pub key: String,
    /// Element type.
    pub dtype: StorageDtype,
    /// Where it was saved from (`cpu`, `cuda:0`); tensors are always read to the CPU.
    pub location: String,
    /// Elements in the storage.
    pub numel: u64,
}

/// A tensor record (`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`):
/// a strided view, in elements, of a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    /// The storage.
    pub storage: StorageRef,
    /// First element, in elements.
    pub offset: u64,
    /// Shape.
    pub shape: Vec<u64>,
    /// Stride per axis, in elements.
    pub stride: Vec<u64>,
    /// Whether it was saved as requiring gradients (a parameter).
    pub requires_grad: bool,
}

/// Inert unpickled data.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits 64 bits.
    Int(i64),
    /// A float.
    Float(f64),
    /// A str.
    Str(String),
    /// Bytes (`_codecs.encode(s, 'latin1')` at protocol 2, `BINBYTES` later).
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A list.
    List(Vec<Value>),
    /// A dict or OrderedDict, in insertion order (a key set twice appears twice).
    Dict(Vec<(Value, Value)>),
    /// A tensor record.
    Tensor(TensorRef),
    /// A storage record not wrapped in a tensor.
    Storage(StorageRef),
    /// `torch.device(...)`, as `cpu` or `cuda:0`.
    Device(String),
    /// `numpy.dtype(...)`, by its code (`f4`).
    Dtype(String),
    /// A numpy scalar: its dtype code and raw bytes.
    NumpyScalar {
        /// Dtype code.
        dtype: String,
        /// Raw bytes.
        bytes: Vec<u8>,
    },
    /// An allowlisted callable or class left uncalled, by its dotted name.
    Global(String),
}

impl Value {
    /// The value of the last entry with string key `key`, for a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .rev()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string, for a str.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, for an int.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The items, for a tuple or a list.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }

    /// A short name of the variant, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Tensor(_) => "tensor",
            Value::Storage(_) => "storage",
            Value::Device(_) => "torch.device",
            Value::Dtype(_) => "numpy.dtype",
            Value::NumpyScalar { .. } => "numpy scalar",
            Value::Global(_) => "global",
        }
    }
}

/// Unpickle `data` with the default [`Limits`].
///
/// # Errors
/// [`PickleError`] for any opcode or global outside the allowlist, malformed or truncated
/// input, or a bound exceeded; never panics.
pub fn parse(data: &[u8]) -> Result<Value, PickleError> {
    parse_with(data, &Limits::default())
}

/// Unpickle `data` within `limits`.
///
/// # Errors
/// As [`parse`].
pub fn parse_with(data: &[u8], limits: &Limits) -> Result<Value, PickleError> {
    if data.len() > limits.max_input {
        return Err(PickleError::Limit {
            offset: 0,
            what: "bytes of pickle",
            limit: limits.max_input,
        });
    }
    let mut m = Machine {
        data,
        pos: 0,
        op_at: 0,
        op_name: "",
        limits,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: Vec::new(),
        objs: Vec::new(),
        items: 0,
    };
    let root = m.run()?;
    let mut budget = limits.max_nodes;
    m.resolve(&root, 0, &mut budget)
}

// ---------------------------------------------------------------------------------------
// The machine. Values on the stack are cheap to copy: scalars and strings by value (strings
// behind Rc), containers and records as indices into an arena, so that the memo shares
// them as Python does (a container memoised before it is filled is seen filled later).

#[derive(Debug, Clone)]
enum V {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Obj(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    RebuildTensorV2,
    RebuildParameter,
    Storage(StorageDtype),
    Device,
    OrderedDict,
    NumpyDtype,
    NumpyScalar,
    CodecsEncode,
}

impl Global {
    fn lookup(module: &str, name: &str) -> Option<Global> {
        Some(match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch", "device") => Global::Device,
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("numpy", "dtype") => Global::NumpyDtype,
            ("numpy._core.multiarray" | "numpy.core.multiarray", "scalar") => Global::NumpyScalar,
            ("_codecs", "encode") => Global::CodecsEncode,
            ("torch", n) => Global::Storage(
                StorageDtype::ALL
                    .iter()
                    .find(|(c, _)| *c == n)
                    .map(|(_, d)| *d)?,
            ),
            _ => return None,
        })
    }

    fn name(self) -> String {
        match self {
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2".into(),
            Global::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Global::Storage(d) => format!("torch.{}", d.class_name()),
            Global::Device => "torch.device".into(),
            Global::OrderedDict => "collections.OrderedDict".into(),
            Global::NumpyDtype => "numpy.dtype".into(),
            Global::NumpyScalar => "numpy._core.multiarray.scalar".into(),
            Global::CodecsEncode => "_codecs.encode".into(),
        }
    }
}

#[derive(Debug)]
enum Obj {
    Tuple(Vec<V>),
    List(Vec<V>),
    Dict(Vec<(V, V)>),
    Global(Global),
    Storage(StorageRef),
    Tensor(TensorRef),
    Device(String),
    Dtype(String),
    NumpyScalar(String, Vec<u8>),
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    op_at: usize,
    op_name: &'static str,
    limits: &'a Limits,
    stack: Vec<V>,
    /// Stack lengths at each open MARK.
    marks: Vec<usize>,
    memo: Vec<Option<V>>,
    objs: Vec<Obj>,
    /// Values created so far (bounded by `limits.max_items`).
    items: usize,
}

/// Names of every pickle opcode (pickletools), for messages about refused ones.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

impl<'a> Machine<'a> {
    fn err(&self, why: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            offset: self.op_at,
            opcode: self.op_name,
            why: why.into(),
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(PickleError::Truncated {
                offset: self.pos,
                what,
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, PickleError> {
        Ok(self.take(1, what)?[0])
    }

    fn arr<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], PickleError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// A length prefix, checked against the bytes left so nothing larger is allocated.
    fn len_prefixed(&mut self, len: u64, what: &'static str) -> Result<&'a [u8], PickleError> {
        let left = self.data.len() - self.pos;
        match usize::try_from(len) {
            Ok(n) if n <= left => self.take(n, what),
            _ => Err(PickleError::Truncated {
                offset: self.pos,
                what,
            }),
        }
    }

    fn line(&mut self, what: &'static str) -> Result<&'a str, PickleError> {
        // Module and attribute names are short; a bound keeps the scan linear overall.
        const MAX_LINE: usize = 256;
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .take(MAX_LINE + 1)
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated {
                offset: self.pos,
                what,
            })?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| self.err("name is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn count(&mut self) -> Result<(), PickleError> {
        self.items += 1;
        if self.items > self.limits.max_items {
            return Err(PickleError::Limit {
                offset: self.op_at,
                what: "values",
                limit: self.limits.max_items,
            });
        }
        Ok(())
    }

    fn push(&mut self, v: V) -> Result<(), PickleError> {
        self.count()?;
        self.stack.push(v);
        Ok(())
    }

    fn new_obj(&mut self, o: Obj) -> Result<V, PickleError> {
        self.count()?;
        self.objs.push(o);
        Ok(V::Obj(self.objs.len() - 1))
    }

    fn base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<V, PickleError> {
        if self.stack.len() <= self.base() {
            return Err(self.err("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&self) -> Result<&V, PickleError> {
        if self.stack.len() <= self.base() {
            return Err(self.err("stack underflow"));
        }
        self.stack.last().ok_or_else(|| self.err("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<V>, PickleError> {
        let at = self.marks.pop().ok_or_else(|| self.err("no MARK"))?;
        if at > self.stack.len() {
            return Err(self.err("MARK beyond the stack"));
        }
        Ok(self.stack.split_off(at))
    }

    fn obj(&self, v: &V) -> Option<&Obj> {
        match v {
            V::Obj(i) => self.objs.get(*i),
            _ => None,
        }
    }

    fn memo_put(&mut self, idx: u64) -> Result<(), PickleError> {
        let v = self.top()?.clone();
        let i = usize::try_from(idx)
            .ok()
            .filter(|&i| i < self.limits.max_memo)
            .ok_or(PickleError::Limit {
                offset: self.op_at,
                what: "memo entries",
                limit: self.limits.max_memo,
            })?;
        if i >= self.memo.len() {
            self.memo.resize(i + 1, None);
        }
        self.memo[i] = Some(v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u64) -> Result<(), PickleError> {
        let v = usize::try_from(idx)
            .ok()
            .and_then(|i| self.memo.get(i))
            .and_then(Option::clone)
            .ok_or_else(|| self.err(format!("memo entry {idx} was never put")))?;
        self.push(v)
    }

    fn append(&mut self, list: &V, items: Vec<V>) -> Result<(), PickleError> {
        match list {
            V::Obj(i) => match self.objs.get_mut(*i) {
                Some(Obj::List(l)) => {
                    l.extend(items);
                    Ok(())
                }
                _ => Err(self.err("appending to something that is not a list")),
            },
            _ => Err(self.err("appending to something that is not a list")),
        }
    }

    fn set_items(&mut self, dict: &V, kv: Vec<V>) -> Result<(), PickleError> {
        if !kv.len().is_multiple_of(2) {
            return Err(self.err("odd number of items for a dict"));
        }
        const NOT_A_DICT: &str = "setting items on something that is not a dict";
        let V::Obj(i) = dict else {
            return Err(self.err(NOT_A_DICT));
        };
        let Some(Obj::Dict(d)) = self.objs.get_mut(*i) else {
            return Err(self.err(NOT_A_DICT));
        };
        let mut it = kv.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), PickleError> {
        let g = Global::lookup(module, name).ok_or_else(|| PickleError::Global {
            offset: self.op_at,
            module: module.chars().take(200).collect(),
            name: name.chars().take(200).collect(),
        })?;
        let v = self.new_obj(Obj::Global(g))?;
        self.push(v)
    }

    fn run(&mut self) -> Result<V, PickleError> {
        loop {
            self.op_at = self.pos;
            let op = self.u8("opcode")?;
            self.op_name = opcode_name(op);
            if self.marks.len() > self.limits.max_depth {
                return Err(PickleError::Limit {
                    offset: self.op_at,
                    what: "nested MARKs",
                    limit: self.limits.max_depth,
                });
            }
            match op {
                0x80 => {
                    let p = self.u8("protocol")?;
                    if p > 5 {
                        return Err(self.err(format!("protocol {p}")));
                    }
                }
                0x95 => {
                    // FRAME: a length hint for buffered reading; the opcodes follow inline.
                    self.take(8, "frame length")?;
                }
                b'.' => {
                    let v = self.pop()?;
                    if !self.marks.is_empty() {
                        return Err(self.err("STOP inside an open MARK"));
                    }
                    return Ok(v);
                }
                b'(' => {
                    self.count()?;
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    if self.stack.len() > self.base() {
                        self.pop()?;
                    } else if self.marks.pop().is_none() {
                        return Err(self.err("stack underflow"));
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'N' => self.push(V::None)?,
                0x88 => self.push(V::Bool(true))?,
                0x89 => self.push(V::Bool(false))?,
                b'J' => {
                    let v = i32::from_le_bytes(self.arr("BININT")?);
                    self.push(V::Int(i64::from(v)))?;
                }
                b'K' => {
                    let v = self.u8("BININT1")?;
                    self.push(V::Int(i64::from(v)))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.arr("BININT2")?);
                    self.push(V::Int(i64::from(v)))?;
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        u64::from(self.u8("LONG1 length")?)
                    } else {
                        u64::from(u32::from_le_bytes(self.arr("LONG4 length")?))
                    };
                    let b = self.len_prefixed(n, "long")?;
                    let v = long(b).ok_or_else(|| self.err("integer wider than 64 bits"))?;
                    self.push(V::Int(v))?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.arr("BINFLOAT")?);
                    self.push(V::Float(v))?;
                }
                b'X' | 0x8c => {
                    let n = if op == b'X' {
                        u64::from(u32::from_le_bytes(self.arr("BINUNICODE length")?))
                    } else {
                        u64::from(self.u8("SHORT_BINUNICODE length")?)
                    };
                    let b = self.len_prefixed(n, "str")?;
                    let s = std::str::from_utf8(b).map_err(|_| self.err("str is not UTF-8"))?;
                    self.push(V::Str(Rc::from(s)))?;
                }
                b'B' | b'C' => {
                    let n = if op == b'B' {
                        u64::from(u32::from_le_bytes(self.arr("BINBYTES length")?))
                    } else {
                        u64::from(self.u8("SHORT_BINBYTES length")?)
                    };
                    let b = self.len_prefixed(n, "bytes")?;
                    self.push(V::Bytes(Rc::from(b)))?;
                }
                b']' => {
                    let v = self.new_obj(Obj::List(Vec::new()))?;
                    self.push(v)?;
                }
                b'}' => {
                    let v = self.new_obj(Obj::Dict(Vec::new()))?;
                    self.push(v)?;
                }
                b')' => {
                    let v = self.new_obj(Obj::Tuple(Vec::new()))?;
                    self.push(v)?;
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.new_obj(Obj::Tuple(items))?;
                    self.push(v)?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.new_obj(Obj::Tuple(items))?;
                    self.push(v)?;
                }
                b'a' => {
                    let item = self.pop()?;
                    let list = self.top()?.clone();
                    self.append(&list, vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let list = self.top()?.clone();
                    self.append(&list, items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let dict = self.top()?.clone();
                    self.set_items(&dict, vec![k, v])?;
                }
                b'u' => {
                    let kv = self.pop_mark()?;
                    let dict = self.top()?.clone();
                    self.set_items(&dict, kv)?;
                }
                b'h' => {
                    let i = self.u8("BINGET")?;
                    self.memo_get(u64::from(i))?;
                }
                b'j' => {
                    let i = u32::from_le_bytes(self.arr("LONG_BINGET")?);
                    self.memo_get(u64::from(i))?;
                }
                b'q' => {
                    let i = self.u8("BINPUT")?;
                    self.memo_put(u64::from(i))?;
                }
                b'r' => {
                    let i = u32::from_le_bytes(self.arr("LONG_BINPUT")?);
                    self.memo_put(u64::from(i))?;
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    self.memo_put(i)?;
                }
                b'c' => {
                    let module = self.line("GLOBAL module")?;
                    let name = self.line("GLOBAL name")?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (V::Str(module), V::Str(name)) = (module, name) else {
                        return Err(self.err("module and name must be strs"));
                    };
                    self.global(&module, &name)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let s = self.storage(&pid)?;
                    let v = self.new_obj(Obj::Storage(s))?;
                    self.push(v)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(&callable, &args)?;
                    self.push(v)?;
                }
                b'b' => {
                    // BUILD would call __setstate__ or update __dict__: attributes only
                    // (an OrderedDict's `_metadata`, a dtype's byte order), never items,
                    // so the state is dropped.
                    let _state = self.pop()?;
                    if !matches!(self.top()?, V::Obj(_)) {
                        return Err(self.err("BUILD on a plain value"));
                    }
                }
                _ => {
                    return Err(PickleError::Opcode {
                        offset: self.op_at,
                        opcode: op,
                        name: self.op_name,
                    })
                }
            }
        }
    }

    fn tuple_items(&self, v: &V) -> Option<&[V]> {
        match self.obj(v) {
            Some(Obj::Tuple(t)) => Some(t),
            _ => None,
        }
    }

    fn ints(&self, v: &V, what: &str) -> Result<Vec<u64>, PickleError> {
        let items = self
            .tuple_items(v)
            .ok_or_else(|| self.err(format!("{what}: a tuple expected")))?;
        items
            .iter()
            .map(|x| match x {
                V::Int(i) => u64::try_from(*i).map_err(|_| self.err(format!("{what}: {i} < 0"))),
                _ => Err(self.err(format!("{what}: ints expected"))),
            })
            .collect()
    }

    /// torch.save's persistent id of a storage: `('storage', <class>, key, location, numel)`.
    fn storage(&self, pid: &V) -> Result<StorageRef, PickleError> {
        let bad = || self.err("persistent id is not ('storage', <class>, key, location, numel)");
        let t = self.tuple_items(pid).ok_or_else(bad)?;
        let [V::Str(tag), class, V::Str(key), V::Str(location), V::Int(numel)] = t else {
            return Err(bad());
        };
        let Some(Obj::Global(Global::Storage(dtype))) = self.obj(class) else {
            return Err(bad());
        };
        if &**tag != "storage" {
            return Err(bad());
        }
        Ok(StorageRef {
            key: key.to_string(),
            dtype: *dtype,
            location: location.to_string(),
            numel: u64::try_from(*numel).map_err(|_| self.err("negative storage size"))?,
        })
    }

    /// REDUCE of an allowlisted callable: computed as inert data, never called.
    fn reduce(&mut self, callable: &V, args: &V) -> Result<V, PickleError> {
        let Some(Obj::Global(g)) = self.obj(callable) else {
            return Err(self.err("the callable is not an allowlisted global"));
        };
        let g = *g;
        let args = self
            .tuple_items(args)
            .ok_or_else(|| self.err(format!("{}: arguments are not a tuple", g.name())))?
            .to_vec();
        let bad = |m: &Self| m.err(format!("{}: unexpected arguments", g.name()));
        match g {
            Global::RebuildTensorV2 => {
                // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
                let (storage, offset, size, stride, requires_grad) = match &args[..] {
                    [s, V::Int(o), size, stride, V::Bool(rg), _hooks]
                    | [s, V::Int(o), size, stride, V::Bool(rg), _hooks, _] => {
                        (s, *o, size, stride, *rg)
                    }
                    _ => return Err(bad(self)),
                };
                let Some(Obj::Storage(storage)) = self.obj(storage) else {
                    return Err(bad(self));
                };
                let storage = storage.clone();
                let shape = self.ints(size, "tensor size")?;
                let stride = self.ints(stride, "tensor stride")?;
                if shape.len() != stride.len() {
                    return Err(self.err("tensor size and stride differ in length"));
                }
                let offset =
                    u64::try_from(offset).map_err(|_| self.err("negative storage offset"))?;
                self.new_obj(Obj::Tensor(TensorRef {
                    storage,
                    offset,
                    shape,
                    stride,
                    requires_grad,
                }))
            }
            Global::RebuildParameter => match &args[..] {
                [t, V::Bool(_), _hooks] if matches!(self.obj(t), Some(Obj::Tensor(_))) => {
                    Ok(t.clone())
                }
                _ => Err(bad(self)),
            },
            Global::OrderedDict => {
                if args.is_empty() {
                    self.new_obj(Obj::Dict(Vec::new()))
                } else {
                    Err(bad(self))
                }
            }
            Global::Device => {
                let d = match &args[..] {
                    [V::Str(t)] => t.to_string(),
                    [V::Str(t), V::Int(i)] => format!("{t}:{i}"),
                    _ => return Err(bad(self)),
                };
                self.new_obj(Obj::Device(d))
            }
            Global::NumpyDtype => match &args[..] {
                [V::Str(code), V::Bool(_), V::Bool(_)] => {
                    let code = code.to_string();
                    self.new_obj(Obj::Dtype(code))
                }
                _ => Err(bad(self)),
            },
            Global::NumpyScalar => match &args[..] {
                [dt, V::Bytes(b)] => {
                    let Some(Obj::Dtype(code)) = self.obj(dt) else {
                        return Err(bad(self));
                    };
                    let o = Obj::NumpyScalar(code.clone(), b.to_vec());
                    self.new_obj(o)
                }
                _ => Err(bad(self)),
            },
            Global::CodecsEncode => match &args[..] {
                // Protocol 2 writes bytes as _codecs.encode(<latin-1 text>, 'latin1').
                [V::Str(s), V::Str(enc)] if matches!(&**enc, "latin1" | "latin-1") => {
                    let b = s
                        .chars()
                        .map(|c| u8::try_from(u32::from(c)).ok())
                        .collect::<Option<Vec<u8>>>()
                        .ok_or_else(|| self.err("_codecs.encode: not latin-1 text"))?;
                    Ok(V::Bytes(Rc::from(b)))
                }
                _ => Err(bad(self)),
            },
            Global::Storage(_) => Err(self.err(format!("{} cannot be called", g.name()))),
        }
    }

    /// The arena value as a tree, within the depth and node budget (a cycle exceeds the
    /// depth; heavy sharing exceeds the budget).
    fn resolve(&self, v: &V, depth: usize, budget: &mut usize) -> Result<Value, PickleError> {
        let limit = |what, limit| PickleError::Limit {
            offset: self.data.len(),
            what,
            limit,
        };
        if depth > self.limits.max_depth {
            return Err(limit("levels of nesting", self.limits.max_depth));
        }
        *budget = budget
            .checked_sub(1)
            .ok_or(limit("values in the result", self.limits.max_nodes))?;
        let seq = |items: &[V], budget: &mut usize| -> Result<Vec<Value>, PickleError> {
            items
                .iter()
                .map(|x| self.resolve(x, depth + 1, budget))
                .collect()
        };
        Ok(match v {
            V::None => Value::None,
            V::Bool(b) => Value::Bool(*b),
            V::Int(i) => Value::Int(*i),
            V::Float(f) => Value::Float(*f),
            V::Str(s) => Value::Str(s.to_string()),
            V::Bytes(b) => Value::Bytes(b.to_vec()),
            V::Obj(i) => match self.objs.get(*i) {
                None => {
                    return Err(PickleError::Malformed {
                        offset: self.data.len(),
                        opcode: "STOP",
                        why: "dangling object".into(),
                    })
                }
                Some(Obj::Tuple(t)) => Value::Tuple(seq(t, budget)?),
                Some(Obj::List(l)) => Value::List(seq(l, budget)?),
                Some(Obj::Dict(d)) => Value::Dict(
                    d.iter()
                        .map(|(k, v)| {
                            Ok((
                                self.resolve(k, depth + 1, budget)?,
                                self.resolve(v, depth + 1, budget)?,
                            ))
                        })
                        .collect::<Result<_, PickleError>>()?,
                ),
                Some(Obj::Global(g)) => Value::Global(g.name()),
                Some(Obj::Storage(s)) => Value::Storage(s.clone()),
                Some(Obj::Tensor(t)) => Value::Tensor(t.clone()),
                Some(Obj::Device(d)) => Value::Device(d.clone()),
                Some(Obj::Dtype(d)) => Value::Dtype(d.clone()),
                Some(Obj::NumpyScalar(d, b)) => Value::NumpyScalar {
                    dtype: d.clone(),
                    bytes: b.clone(),
                },
            },
        })
    }
}

/// A little-endian two's-complement integer of up to 8 bytes (LONG1/LONG4).
fn long(b: &[u8]) -> Option<i64> {
    if b.len() > 8 {
        return None;
    }
    let Some(&last) = b.last() else {
        return Some(0);
    };
    let fill = if last & 0x80 != 0 { 0xff } else { 0 };
    let mut a = [fill; 8];
    a[..b.len()].copy_from_slice(b);
    Some(i64::from_le_bytes(a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fixture_pickle() -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(
            "tests/data/nnunet/tinyct/model/nnUNetTrainer__nnUNetPlansTiny__3d_fullres/fold_0/checkpoint_final.pth",
        );
        // Read with the `zip` crate: independent of checkpoint.rs's own zip reader.
        let mut z = zip::ZipArchive::new(std::fs::File::open(p).unwrap()).unwrap();
        let mut e = z.by_name("checkpoint_final/data.pkl").unwrap();
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut out).unwrap();
        out
    }

    #[test]
    fn reads_the_fixtures_checkpoint_pickle() {
        let v = parse(&fixture_pickle()).unwrap();
        assert_eq!(
            v.get("trainer_name").and_then(Value::as_str),
            Some("nnUNetTrainer")
        );
        let axes = v.get("inference_allowed_mirroring_axes").unwrap();
        assert_eq!(
            axes,
            &Value::Tuple(vec![Value::Int(0), Value::Int(1), Value::Int(2)])
        );
        let cfg = v.get("init_args").and_then(|a| a.get("configuration"));
        assert_eq!(cfg.and_then(Value::as_str), Some("3d_fullres"));
        assert_eq!(
            v.get("init_args").and_then(|a| a.get("device")),
            Some(&Value::Device("cpu".into()))
        );
        let Some(Value::Dict(w)) = v.get("network_weights") else {
            panic!("no network_weights")
        };
        // As pickletools lists it: the first tensor, a [8, 1, 1, 3, 3] float32 view of
        // storage '0' (72 elements), contiguous strides.
        let (k, t) = &w[0];
        assert_eq!(k.as_str(), Some("encoder.stages.0.0.convs.0.conv.weight"));
        let Value::Tensor(t) = t else { panic!() };
        assert_eq!(t.storage.key, "0");
        assert_eq!(t.storage.dtype, StorageDtype::F32);
        assert_eq!(t.storage.numel, 72);
        assert_eq!(t.shape, vec![8, 1, 1, 3, 3]);
        assert_eq!(t.stride, vec![9, 9, 9, 3, 1]);
        assert_eq!(t.offset, 0);
        assert_eq!(w.len(), 240);
        // The numpy float32 scalars of the training log (numpy.dtype + _codecs.encode).
        let log = v.get("logging").and_then(|l| l.get("mean_fg_dice"));
        let first = log.and_then(Value::as_seq).and_then(|s| s.first());
        assert!(
            matches!(first, Some(Value::NumpyScalar { dtype, bytes }) if dtype == "f4" && bytes.len() == 4)
        );
    }

    /// A pickle from opcodes written by hand (protocol 2 header, STOP appended).
    fn pk(body: &[u8]) -> Vec<u8> {
        let mut v = vec![0x80, 2];
        v.extend_from_slice(body);
        v.push(b'.');
        v
    }

    #[test]
    fn reads_protocol_2_data() {
        // {'a': [1, -2, 2**40, 1.5, None, True], 'b': ('x', b'\xff')} with a memo ref.
        let mut b = vec![
            b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'a', b']', b'(', b'K', 1,
        ];
        b.extend([b'J', 0xfe, 0xff, 0xff, 0xff]);
        b.extend([0x8a, 6, 0, 0, 0, 0, 0, 1]);
        b.push(b'G');
        b.extend(1.5f64.to_be_bytes());
        b.extend([
            b'N', 0x88, b'e', b'X', 1, 0, 0, 0, b'b', b'X', 1, 0, 0, 0, b'x',
        ]);
        b.extend(b"c_codecs\nencode\n");
        b.extend([b'X', 2, 0, 0, 0, 0xc3, 0xbf, b'X', 6, 0, 0, 0]);
        b.extend(b"latin1");
        b.extend([0x86, b'R', 0x86, b'u']);
        let v = parse(&pk(&b)).unwrap();
        assert_eq!(
            v.get("a"),
            Some(&Value::List(vec![
                Value::Int(1),
                Value::Int(-2),
                Value::Int(1 << 40),
                Value::Float(1.5),
                Value::None,
                Value::Bool(true)
            ]))
        );
        assert_eq!(
            v.get("b"),
            Some(&Value::Tuple(vec![
                Value::Str("x".into()),
                Value::Bytes(vec![0xff])
            ]))
        );
    }

    #[test]
    fn a_container_memoised_before_it_is_filled_is_seen_filled() {
        // l = []; PUT 0; APPEND 7; then (GET 0) as a second reference: [[7], [7]]
        let b = [
            b']', b'q', 0, b'K', 7, b'a', b'0', b']', b'h', 0, b'a', b'h', 0, b'a',
        ];
        let v = parse(&pk(&b)).unwrap();
        let seven = Value::List(vec![Value::Int(7)]);
        assert_eq!(v, Value::List(vec![seven.clone(), seven]));
    }

    fn refused(data: &[u8]) -> PickleError {
        match parse(data) {
            Ok(v) => panic!("accepted: {v:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn refuses_code_execution_by_global_and_opcode() {
        // os.system('echo pwned') via GLOBAL + REDUCE: refused at the GLOBAL, offset 2.
        let mut b = b"cos\nsystem\n".to_vec();
        b.extend([b'X', 10, 0, 0, 0]);
        b.extend(b"echo pwned");
        b.extend([0x85, b'R']);
        let e = refused(&pk(&b));
        assert_eq!(
            e,
            PickleError::Global {
                offset: 2,
                module: "os".into(),
                name: "system".into()
            }
        );
        assert!(e.to_string().contains("os.system"), "{e}");

        let e = refused(&pk(b"cbuiltins\neval\n"));
        assert!(
            matches!(e, PickleError::Global { ref module, ref name, .. } if module == "builtins" && name == "eval"),
            "{e}"
        );
        // A torch name outside the allowlist.
        let e = refused(&pk(b"ctorch\nload\n"));
        assert!(matches!(e, PickleError::Global { .. }), "{e}");
        // STACK_GLOBAL goes through the same allowlist.
        let mut b = vec![0x8c, 5];
        b.extend(b"posix");
        b.extend([0x8c, 6]);
        b.extend(b"system");
        b.push(0x93);
        assert!(matches!(
            refused(&pk(&b)),
            PickleError::Global { offset: 17, .. }
        ));

        // INST and OBJ build and call classes by themselves.
        let e = refused(&pk(b"(ios\nsystem\n"));
        assert_eq!(
            e,
            PickleError::Opcode {
                offset: 3,
                opcode: b'i',
                name: "INST"
            }
        );
        assert!(e.to_string().contains("INST"), "{e}");
        let e = refused(&pk(b"(o"));
        assert!(matches!(e, PickleError::Opcode { name: "OBJ", .. }), "{e}");
        for (op, name) in [
            (0x81, "NEWOBJ"),
            (0x92, "NEWOBJ_EX"),
            (0x82, "EXT1"),
            (b'P', "PERSID"),
        ] {
            let e = refused(&pk(&[b')', op]));
            assert!(
                matches!(e, PickleError::Opcode { name: n, offset: 3, .. } if n == name),
                "{e}"
            );
        }
        // REDUCE of an allowlisted global that is data, not a function.
        let e = refused(&pk(b"ctorch\nFloatStorage\n)R"));
        assert!(e.to_string().contains("cannot be called"), "{e}");
        // OrderedDict with arguments (would iterate an arbitrary object).
        let e = refused(&pk(b"ccollections\nOrderedDict\nK\x01\x85R"));
        assert!(e.to_string().contains("unexpected arguments"), "{e}");
    }

    #[test]
    fn bounds_hostile_sizes_and_nesting() {
        // A BINUNICODE claiming 4 GB: refused as truncated, nothing allocated.
        let e = refused(&pk(&[b'X', 0xff, 0xff, 0xff, 0xff, b'a']));
        assert!(matches!(e, PickleError::Truncated { offset: 7, .. }), "{e}");
        let e = refused(&pk(&[0x8b, 0xff, 0xff, 0xff, 0x7f]));
        assert!(matches!(e, PickleError::Truncated { .. }), "{e}");
        // A huge memo index.
        let e = refused(&pk(&[b'N', b'r', 0xff, 0xff, 0xff, 0xff]));
        assert!(
            matches!(
                e,
                PickleError::Limit {
                    what: "memo entries",
                    ..
                }
            ),
            "{e}"
        );
        // 100 000 nested MARKs.
        let e = refused(&pk(&vec![b'('; 100_000]));
        assert!(
            matches!(
                e,
                PickleError::Limit {
                    what: "nested MARKs",
                    ..
                }
            ),
            "{e}"
        );
        // 100 000 nested 1-tuples (no marks): refused when resolved, no deep recursion.
        let mut b = vec![b'N'];
        b.extend(std::iter::repeat_n(0x85, 100_000));
        let e = refused(&pk(&b));
        assert!(
            matches!(
                e,
                PickleError::Limit {
                    what: "levels of nesting",
                    ..
                }
            ),
            "{e}"
        );
        // A list containing itself.
        let e = refused(&pk(&[b']', b'q', 0, b'h', 0, b'a']));
        assert!(
            matches!(
                e,
                PickleError::Limit {
                    what: "levels of nesting",
                    ..
                }
            ),
            "{e}"
        );
        // Exponential sharing (billion laughs): each level a pair of the one below.
        let mut b = vec![b'N'];
        for _ in 0..40 {
            b.extend([b'q', 0, b'h', 0, 0x86]);
        }
        let e = refused(&pk(&b));
        assert!(
            matches!(
                e,
                PickleError::Limit {
                    what: "values in the result",
                    ..
                }
            ),
            "{e}"
        );
        // Too many values.
        let small = Limits {
            max_items: 1000,
            ..Limits::default()
        };
        let e = parse_with(&pk(&vec![b'N'; 5000]), &small).unwrap_err();
        assert!(
            matches!(e, PickleError::Limit { what: "values", .. }),
            "{e}"
        );
        // Too large an input.
        let tiny = Limits {
            max_input: 10,
            ..Limits::default()
        };
        assert!(parse_with(&[b'N'; 11], &tiny).is_err());
    }

    #[test]
    fn refuses_malformed_sequences() {
        for (b, want) in [
            (&b"a"[..], "stack underflow"),
            (b"K\x01a", "stack underflow"),
            (b"h\x05", "never put"),
            (b"t", "no MARK"),
            (b"(K\x01", "STOP inside an open MARK"),
            (b"K\x01K\x02a", "not a list"),
            (b"}K\x01s", "stack underflow"),
            (b"K\x01Nb", "BUILD on a plain value"),
            (b"NQ", "persistent id"),
        ] {
            let e = refused(&pk(b));
            assert!(e.to_string().contains(want), "{b:?}: {e}");
        }
        // No STOP.
        assert!(matches!(
            refused(&[0x80, 2, b'N']),
            PickleError::Truncated { offset: 3, .. }
        ));
        assert!(matches!(
            refused(&[]),
            PickleError::Truncated { offset: 0, .. }
        ));
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    #[test]
    fn fuzz_mutations_of_the_fixture_never_panic() {
        let orig = fixture_pickle();
        assert!(parse(&orig).is_ok());
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut ok, mut refused) = (0, 0);
        for i in 0..3000 {
            let mut d = orig.clone();
            match i % 5 {
                0 => {
                    // Bit flips.
                    for _ in 0..1 + rng.below(8) {
                        let at = rng.below(d.len());
                        d[at] ^= 1 << rng.below(8);
                    }
                }
                1 => d.truncate(rng.below(orig.len())),
                2 => {
                    // Random bytes over a random span.
                    let at = rng.below(d.len());
                    let n = 1 + rng.below(64);
                    for b in d.iter_mut().skip(at).take(n) {
                        *b = rng.next() as u8;
                    }
                }
                3 => {
                    // Splice: a span copied elsewhere (opcodes out of context).
                    let from = rng.below(d.len());
                    let n = rng.below(256).min(d.len() - from);
                    let span = d[from..from + n].to_vec();
                    let at = rng.below(d.len());
                    d.splice(at..at, span);
                }
                _ => {
                    // Entirely random bytes after the protocol header.
                    let n = rng.below(512);
                    d = vec![0x80, 2];
                    d.extend((0..n).map(|_| rng.next() as u8));
                }
            }
            match parse(&d) {
                Ok(_) => ok += 1,
                Err(e) => {
                    // Every refusal says where.
                    assert!(e.to_string().starts_with("pickle offset "), "{e}");
                    refused += 1;
                }
            }
        }
        assert!(refused > 1000, "{ok} accepted, {refused} refused");
    }
}
