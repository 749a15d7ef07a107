//! A handle on one instance for driving its exports: calling them by name and moving bytes in
//! and out of its linear memory.

use wasmtime::{Instance, Memory, Store, WasmParams, WasmResults};

use crate::kernel::KernelState;

/// A store and its instance, borrowed for the length of a driver call.
pub(crate) struct Guest<'a> {
    pub(crate) store: &'a mut Store<KernelState>,
    pub(crate) instance: &'a Instance,
}

impl Guest<'_> {
    /// Calls an export with typed parameters and results.
    pub(crate) async fn call<P, R>(&mut self, name: &str, params: P) -> wasmtime::Result<R>
    where
        P: WasmParams + Sync,
        R: WasmResults + Sync,
    {
        let func = self.instance.get_typed_func::<P, R>(&mut *self.store, name)?;
        func.call_async(&mut *self.store, params).await
    }

    fn memory(&mut self) -> wasmtime::Result<Memory> {
        self.instance
            .get_memory(&mut *self.store, "memory")
            .ok_or_else(|| wasmtime::format_err!("the module exports no memory"))
    }

    /// Copies `bytes` into guest memory at `ptr`.
    pub(crate) fn write(&mut self, ptr: u32, bytes: &[u8]) -> wasmtime::Result<()> {
        let memory = self.memory()?;
        memory.write(&mut *self.store, usize::try_from(ptr)?, bytes)?;
        Ok(())
    }

    /// Reads `len` bytes of guest memory at `ptr`, refusing ranges past `max_len`.
    pub(crate) fn read(&mut self, ptr: u32, len: u32, max_len: usize) -> wasmtime::Result<Vec<u8>> {
        let len = usize::try_from(len)?;
        if len > max_len {
            wasmtime::bail!("the guest returned {len} bytes, more than the {max_len} allowed");
        }
        let memory = self.memory()?;
        let mut buffer = vec![0; len];
        memory.read(&*self.store, usize::try_from(ptr)?, &mut buffer)?;
        Ok(buffer)
    }

    /// Reads a little-endian u32 of guest memory at `ptr`.
    pub(crate) fn read_u32(&mut self, ptr: u32) -> wasmtime::Result<u32> {
        let bytes = self.read(ptr, 4, 4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }
}

/// Reinterprets an i32 returned by the guest as the pointer it is.
pub(crate) fn ptr(value: i32) -> u32 {
    u32::from_ne_bytes(value.to_ne_bytes())
}

/// Reinterprets a host length or pointer as the i32 the guest's ABI takes.
pub(crate) fn abi(value: u32) -> i32 {
    i32::from_ne_bytes(value.to_ne_bytes())
}
