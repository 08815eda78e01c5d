//! The kinds of operation every layer names: backends submit them, queues report them, errors
//! and measurement windows are kept per kind. At the bottom so that none of those layers needs
//! another to say "a read".

/// Kinds of operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum OpKind {
    Read,
    Write,
    Flush,
    WriteZeroes,
    /// Deallocate (trim / discard / punch hole): the range's contents become undefined (zeros on
    /// files and on devices that guarantee it).
    Deallocate,
}

impl std::fmt::Display for OpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::WriteZeroes => "write-zeroes",
            OpKind::Deallocate => "deallocate",
        })
    }
}
