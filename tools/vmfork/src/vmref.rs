//! How a command names a VM: `vmN`, `N`, or its name (`counter`, `counter.2`).
//!
//! Ids need no lookup: `vm3` and `3` are VM 3 whether or not it exists (the monitor says if it
//! does not). A name is looked up in the monitor's list, and must name exactly one VM: names
//! are not unique (every restore of one snapshot has the snapshot's name), so an ambiguous name
//! is refused with the ids it could mean. Because of that rule a VM whose name is only digits,
//! or `vm` and digits, is named by its id.

use std::fmt;
use std::str::FromStr;

use vmfork_proto::VmInfo;

/// A VM as a command line names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmRef {
    /// `N` or `vmN`.
    Id(u32),
    /// Anything else: a name to look up.
    Name(String),
}

impl FromStr for VmRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(String::from(
                "a VM is named by its id (3 or vm3) or its name",
            ));
        }
        let digits = s.strip_prefix("vm").unwrap_or(s);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            return digits
                .parse()
                .map(VmRef::Id)
                .map_err(|_| format!("{s}: no VM id is that large"));
        }
        if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(format!(
                "{s:?}: VM names have no spaces or control characters"
            ));
        }
        Ok(VmRef::Name(s.to_string()))
    }
}

impl fmt::Display for VmRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmRef::Id(id) => write!(f, "vm{id}"),
            VmRef::Name(n) => f.write_str(n),
        }
    }
}

/// Why a name names no single VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolveError {
    /// No VM has that name.
    NoSuchName(String),
    /// Several VMs have it (their ids, in order).
    Ambiguous(String, Vec<u32>),
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::NoSuchName(n) => write!(f, "no VM is named {n}"),
            ResolveError::Ambiguous(n, ids) => {
                let ids: Vec<String> = ids.iter().map(|i| format!("vm{i}")).collect();
                write!(
                    f,
                    "{} VMs are named {n} ({}): name one by its id",
                    ids.len(),
                    ids.join(", ")
                )
            }
        }
    }
}

impl VmRef {
    /// The id, when the name needs no lookup.
    pub fn id(&self) -> Option<u32> {
        match self {
            VmRef::Id(id) => Some(*id),
            VmRef::Name(_) => None,
        }
    }

    /// The id this names among `vms` (the monitor's list). A name several VMs have names the
    /// one of them that is live, if only one is: a stopped VM's record keeps its name, and a
    /// new VM of that name (the guest booted again) must not make the name useless.
    pub fn resolve(&self, vms: &[VmInfo]) -> Result<u32, ResolveError> {
        match self {
            VmRef::Id(id) => Ok(*id),
            VmRef::Name(name) => {
                let named: Vec<&VmInfo> = vms.iter().filter(|v| &v.name == name).collect();
                let live: Vec<u32> = named
                    .iter()
                    .filter(|v| !matches!(v.state, vmfork_proto::VmState::Stopped { .. }))
                    .map(|v| v.id.0)
                    .collect();
                match (named.as_slice(), live.as_slice()) {
                    ([], _) => Err(ResolveError::NoSuchName(name.clone())),
                    ([one], _) => Ok(one.id.0),
                    (_, [one]) => Ok(*one),
                    (all, _) => Err(ResolveError::Ambiguous(
                        name.clone(),
                        all.iter().map(|v| v.id.0).collect(),
                    )),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmfork_proto::{VmId, VmState};

    fn vm(id: u32, name: &str) -> VmInfo {
        VmInfo {
            id: VmId(id),
            name: name.into(),
            parent: None,
            state: VmState::Running,
            vcpus: 1,
            mem_bytes: 16 << 20,
            private_pages: 0,
            shared_pages: 0,
            cow_faults: 0,
            forks: 0,
            last_fork_ticks: 0,
            uptime_us: 0,
            vcpu_us: 0,
        }
    }

    #[test]
    fn ids_parse_with_and_without_the_prefix() {
        assert_eq!("3".parse(), Ok(VmRef::Id(3)));
        assert_eq!("vm3".parse(), Ok(VmRef::Id(3)));
        assert_eq!("vm0".parse(), Ok(VmRef::Id(0)));
        assert_eq!("counter".parse(), Ok(VmRef::Name("counter".into())));
        assert_eq!("counter.2".parse(), Ok(VmRef::Name("counter.2".into())));
        // `vm` alone, or with more than digits after it, is a name.
        assert_eq!("vm".parse(), Ok(VmRef::Name("vm".into())));
        assert_eq!("vm3a".parse(), Ok(VmRef::Name("vm3a".into())));
        assert!("99999999999"
            .parse::<VmRef>()
            .unwrap_err()
            .contains("large"));
        assert!("".parse::<VmRef>().is_err());
        assert!("two words".parse::<VmRef>().is_err());
        assert!("bad\u{1b}[1m".parse::<VmRef>().is_err());
    }

    #[test]
    fn names_resolve_to_exactly_one_vm() {
        let vms = [
            vm(1, "counter"),
            vm(2, "counter.2"),
            vm(4, "linux"),
            vm(5, "linux"),
        ];
        assert_eq!(VmRef::Name("counter".into()).resolve(&vms), Ok(1));
        assert_eq!(VmRef::Name("counter.2".into()).resolve(&vms), Ok(2));
        assert_eq!(
            VmRef::Name("echo".into()).resolve(&vms),
            Err(ResolveError::NoSuchName("echo".into()))
        );
        let amb = VmRef::Name("linux".into()).resolve(&vms).unwrap_err();
        assert_eq!(amb, ResolveError::Ambiguous("linux".into(), vec![4, 5]));
        assert_eq!(
            amb.to_string(),
            "2 VMs are named linux (vm4, vm5): name one by its id"
        );
        // An id is taken as it is, listed or not: the monitor answers for it.
        assert_eq!(VmRef::Id(9).resolve(&vms), Ok(9));
    }

    #[test]
    fn a_name_a_stopped_vm_shares_names_the_live_one() {
        let stopped = |id, name| VmInfo {
            state: VmState::Stopped {
                reason: vmfork_proto::StopReason::PowerOff,
            },
            ..vm(id, name)
        };
        let vms = [stopped(1, "counter"), vm(2, "counter"), stopped(3, "echo")];
        assert_eq!(VmRef::Name("counter".into()).resolve(&vms), Ok(2));
        // A record alone is named by its name (to `rm` or `info` it).
        assert_eq!(VmRef::Name("echo".into()).resolve(&vms), Ok(3));
        // Two records and no live VM: ambiguous.
        let vms = [stopped(1, "counter"), stopped(2, "counter")];
        assert_eq!(
            VmRef::Name("counter".into()).resolve(&vms),
            Err(ResolveError::Ambiguous("counter".into(), vec![1, 2]))
        );
    }
}
