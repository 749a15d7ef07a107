//! Kernel calls of the native tier. This is the one place in SoulBox allowed `unsafe`; every
//! block says why it is sound.

#[cfg(test)]
pub(crate) mod probe;
