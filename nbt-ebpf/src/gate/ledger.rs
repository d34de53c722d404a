//! The balance as the kernel sees it, payments, and the counts kept per destination.
//!
//! balance = credit - time_debit - call_debit - egress_debit (see `nbt_common::gate`).
//! A payment reads the balance, and adds its cost with an atomic add only when the balance
//! covers it. Payments on different CPUs at the same instant can each see the same last units:
//! the balance can then go below zero by at most one payment per other CPU (BPF before v3 has
//! no atomic fetch-and-add to reserve with, and nbt builds for v1). One program at a time pays
//! exactly.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap},
};
use nbt_common::gate::{DestCounts, DestKey, KernelLedger, CREDIT, MAX_DESTINATIONS, TIME_DEBIT};

use super::packet::Dest;
use crate::atomic_add;

#[map(name = "KERNEL_LEDGER")]
static KERNEL_LEDGER: Array<KernelLedger> = Array::with_max_entries(1, 0);
#[map(name = "USER_LEDGER")]
static USER_LEDGER: Array<i64> = Array::with_max_entries(2, 0);
/// One more entry than destinations: the "other destinations" key, which nbt adds at attach.
#[map(name = "GATE_BY_DEST")]
static GATE_BY_DEST: HashMap<DestKey, DestCounts> =
    HashMap::with_max_entries(MAX_DESTINATIONS + 1, 0);

const BPF_NOEXIST: u64 = 1;

pub enum Payment {
    Paid,
    /// Refused; the balance it saw, for the log.
    Refused(i64),
}

fn credits() -> i64 {
    let credit = USER_LEDGER.get(CREDIT).copied().unwrap_or(0);
    let time_debit = USER_LEDGER.get(TIME_DEBIT).copied().unwrap_or(0);
    credit.wrapping_sub(time_debit)
}

/// The egress debit: a plain read of a word other CPUs add to atomically.
fn egress_debit(ledger: *const KernelLedger) -> u64 {
    // SAFETY: a map value pointer valid for this program run.
    unsafe { core::ptr::read_volatile(&(*ledger).egress_debit_pico) }
}

fn balance() -> i64 {
    let Some(ledger) = KERNEL_LEDGER.get_ptr(0) else {
        return 0;
    };
    // SAFETY: as in `egress_debit`.
    let calls = unsafe { core::ptr::read_volatile(&(*ledger).call_debit_pico) };
    credits()
        .wrapping_sub(calls as i64)
        .wrapping_sub(egress_debit(ledger) as i64)
}

/// Whether the balance could pay `cost` now (a cost of 0 needs a balance above zero), without
/// paying it; the balance it saw when it could not.
pub fn could_pay(cost: u64) -> Result<(), i64> {
    let balance = balance();
    let enough = if cost == 0 {
        balance > 0
    } else {
        balance >= 0 && balance as u64 >= cost
    };
    if enough {
        Ok(())
    } else {
        Err(balance)
    }
}

/// Pays a call's price and its bytes' price, or nothing. A payment of 0 passes while the
/// balance is above zero.
pub fn pay(call: u64, bytes: u64) -> Payment {
    if let Err(balance) = could_pay(call.saturating_add(bytes)) {
        return Payment::Refused(balance);
    }
    if let Some(ledger) = KERNEL_LEDGER.get_ptr_mut(0) {
        // SAFETY: fields of the map value, valid for this program run, 8-byte aligned.
        unsafe {
            atomic_add(&mut (*ledger).call_debit_pico, call);
            atomic_add(&mut (*ledger).egress_debit_pico, bytes);
        }
    }
    Payment::Paid
}

/// Adds `$value` to the ledger's counter `$field`.
macro_rules! add {
    ($field:ident, $value:expr) => {
        if let Some(ledger) = KERNEL_LEDGER.get_ptr_mut(0) {
            // SAFETY: a field of the map value, valid for this program run, 8-byte aligned.
            unsafe { atomic_add(&mut (*ledger).$field, $value) };
        }
    };
}

pub fn count_call(dest: &Dest) {
    add!(calls, 1);
    count_dest(dest, 1, 0);
}

pub fn count_request() {
    add!(requests, 1);
}

pub fn count_refused_call(dest: &Dest) {
    add!(blocked_calls, 1);
    count_dest(dest, 0, 1);
}

pub fn count_refused_request() {
    add!(refused_requests, 1);
}

pub fn count_dropped_packet() {
    add!(blocked_packets, 1);
}

pub fn count_bytes(bytes: u64) {
    add!(egress_bytes, bytes);
}

/// Per destination; past [`MAX_DESTINATIONS`] into the "other destinations" entry.
fn count_dest(dest: &Dest, calls: u64, refused: u64) {
    let key = DestKey {
        family: if dest.v4 { 4 } else { 6 },
        port: u32::from(u16::from_be_bytes(dest.port)),
        addr: dest.addr,
    };
    let counts = match GATE_BY_DEST.get_ptr_mut(&key) {
        Some(counts) => counts,
        None => {
            let new = DestCounts::default();
            // Fails when another CPU added it first (found below) or the map is full.
            let _ = GATE_BY_DEST.insert(&key, &new, BPF_NOEXIST);
            match GATE_BY_DEST.get_ptr_mut(&key) {
                Some(counts) => counts,
                None => match GATE_BY_DEST.get_ptr_mut(&DestKey::default()) {
                    Some(counts) => counts,
                    None => return,
                },
            }
        }
    };
    // SAFETY: a map value pointer valid for this program run, 8-byte aligned.
    unsafe {
        atomic_add(&mut (*counts).calls, calls);
        atomic_add(&mut (*counts).refused, refused);
    }
}
