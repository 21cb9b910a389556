//! The VPC's resolver for the stack's private hosted zone, played by the
//! harness. moto keeps Route 53's records but answers no DNS query (and
//! refuses Route 53's signed GETs while IAM is enforced), so the records
//! are taken from the changes the members sent that moto accepted, as the
//! fault proxy saw them pass, and copied into the names the network's
//! dnsmasq answers for. A stand-in: on AWS, Route 53 answers for a private
//! zone inside the VPCs it is associated with (moto's CloudFormation makes
//! the zone public and associates none).

use crate::faults::Records;
use crate::net::Names;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Copies the records into the network's DNS until dropped.
pub struct Resolver {
    pub records: Records,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Resolver {
    pub fn start(records: Records, names: Names) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopped) = (Arc::clone(&records), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut last = BTreeMap::new();
            while !stopped.load(Ordering::SeqCst) {
                let now = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if now != last && names.set(&now).is_ok() {
                    for (name, ip) in &now {
                        if last.get(name) != Some(ip) {
                            super::say(&format!("DNS: {name} -> {ip}"));
                        }
                    }
                    last = now;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        Self {
            records,
            stop,
            thread: Some(thread),
        }
    }

    /// The address `name` has now, if it has one.
    pub fn lookup(records: &Records, name: &str) -> Option<Ipv4Addr> {
        records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
