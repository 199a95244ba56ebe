//! What every program object of this crate carries: the panic handler a `no_std` binary needs
//! and the license the kernel checks before it allows GPL-only helpers.

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: nothing here can panic, and the verifier rejects loops.
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
