//! Loopback addresses for pods: each pod gets its own `127.x.y.z` so several pods can serve the
//! same container port, as they would on separate network namespaces.

use std::collections::BTreeSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Mutex;

use rand::Rng as _;

/// Addresses held by pods of every simulator in this process. Other processes are noticed by a
/// failed bind, hence the trial binds in [`IpLease::acquire`].
static LEASED: Mutex<BTreeSet<Ipv4Addr>> = Mutex::new(BTreeSet::new());

const ATTEMPTS: usize = 64;

/// A pod's address, given back when dropped.
#[derive(Debug)]
pub(crate) struct IpLease {
    ip: Ipv4Addr,
}

impl IpLease {
    /// A random free address in 127.16.0.1–127.254.255.254 (skipping `.0` and `.255`) on which all
    /// of `ports` can be bound right now.
    pub(crate) fn acquire(ports: &[u16]) -> io::Result<Self> {
        let mut rng = rand::rng();
        let candidates = std::iter::repeat_with(move || {
            Ipv4Addr::new(
                127,
                rng.random_range(16..=254),
                rng.random_range(0..=255),
                rng.random_range(1..=254),
            )
        });
        Self::acquire_from(ports, candidates.take(ATTEMPTS))
    }

    /// The first of `candidates` not leased here on which all of `ports` can be bound.
    fn acquire_from(ports: &[u16], candidates: impl Iterator<Item = Ipv4Addr>) -> io::Result<Self> {
        for ip in candidates {
            if !leased().insert(ip) {
                continue;
            }
            let lease = Self { ip };
            let bound = ports
                .iter()
                .try_for_each(|&port| TcpListener::bind(SocketAddr::from((ip, port))).map(drop));
            match bound {
                Ok(()) => return Ok(lease),
                // Probably another process's pod: try elsewhere (the lease is given back).
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("no free loopback address for ports {ports:?} after {ATTEMPTS} tries"),
        ))
    }

    pub(crate) fn ip(&self) -> Ipv4Addr {
        self.ip
    }
}

impl Drop for IpLease {
    fn drop(&mut self) {
        leased().remove(&self.ip);
    }
}

fn leased() -> std::sync::MutexGuard<'static, BTreeSet<Ipv4Addr>> {
    // The set stays consistent even if a holder panicked: insert and remove are single calls.
    LEASED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_distinct_in_range_and_given_back_on_drop() {
        let leases: Vec<IpLease> = (0..50)
            .map(|_| IpLease::acquire(&[8080]).expect("lease"))
            .collect();
        let ips: BTreeSet<Ipv4Addr> = leases.iter().map(IpLease::ip).collect();
        assert_eq!(ips.len(), 50);
        for ip in &ips {
            let [a, b, _, d] = ip.octets();
            assert_eq!(a, 127);
            assert!((16..=254).contains(&b), "{ip}");
            assert!(d != 0 && d != 255, "{ip}");
            assert!(leased().contains(ip));
        }
        drop(leases);
        assert!(ips.iter().all(|ip| !leased().contains(ip)));
    }

    #[test]
    fn addresses_leased_here_or_with_a_taken_port_are_skipped() {
        let held = IpLease::acquire(&[]).expect("lease");
        let busy = IpLease::acquire(&[]).expect("lease");
        let taken = TcpListener::bind((busy.ip(), 0)).expect("bind");
        let port = taken.local_addr().expect("addr").port();
        let busy_ip = busy.ip();
        drop(busy);
        let free = Ipv4Addr::new(127, 200, 1, 1);
        let lease = IpLease::acquire_from(&[port], [held.ip(), busy_ip, free].into_iter())
            .expect("a free address");
        assert_eq!(lease.ip(), free);
        assert!(
            !leased().contains(&busy_ip),
            "the busy address was given back"
        );
        let none = IpLease::acquire_from(&[port], [held.ip(), busy_ip].into_iter());
        assert_eq!(
            none.expect_err("nothing free").kind(),
            io::ErrorKind::AddrInUse
        );
    }
}
