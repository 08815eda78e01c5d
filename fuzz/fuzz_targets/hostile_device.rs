//! The userspace driver against a hostile device: the software model completes I/O as an
//! arbitrary script says (other command ids, arbitrary status fields and entries,
//! duplicates, drops, garbage EventIdx values). Every command must complete exactly once,
//! with data or a typed error, and nothing may panic (core/tests/support/hostile.rs judges).
#![no_main]

#[path = "../../core/tests/support/hostile.rs"]
mod hostile;

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;

thread_local! {
    static HARNESS: RefCell<Option<hostile::Harness>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    HARNESS.with(|h| {
        let mut h = h.borrow_mut();
        if h.as_ref().is_none_or(|x| x.dead()) {
            *h = Some(hostile::Harness::new());
        }
        let harness = h.as_mut().expect("built above");
        if let Err(e) = harness.run(data) {
            panic!("invariant broken: {e}");
        }
    });
});
