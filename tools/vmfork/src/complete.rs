//! Shell completion with the live VMs: `vmfork completions SHELL` prints clap_complete's script
//! for the commands and options, followed by a little glue of ours that completes every VM
//! argument (the positional `vm`, `vm1`, `vm2`) with the ids (`vm3`) and names of the VMs the
//! running monitor has, which it gets from the hidden `vmfork __complete-vms`.
//!
//! The glue is ours because clap_complete 4.6 offers dynamic completion only behind its
//! `unstable-dynamic` feature (no stability promise, and it replaces the whole script with one
//! that runs the binary for every completion). Ours runs the binary only for a VM argument.
//!
//! `__complete-vms` prints one candidate a line and nothing at all on any error (no socket, no
//! monitor, a monitor that does not answer): a completion must never print errors into the
//! command line nor hang, so its waits are short ([`LIVE_TIMEOUT`]).

use std::path::Path;
use std::time::Duration;

use clap::Command;
use clap_complete::Shell;
use vmfork_core::guest_spec;
use vmfork_proto::VmInfo;

use crate::client::{Client, ClientOptions};

/// The hidden subcommand the glue runs.
pub const SUBCOMMAND: &str = "__complete-vms";

/// How long `__complete-vms` waits for the monitor's hello, and then for its list.
pub const LIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// What completes a VM argument, given the monitor's list: `vmN` for every VM in id order, then
/// every name that names exactly one VM (an ambiguous name would be refused), sorted.
pub fn candidates(vms: &[VmInfo]) -> Vec<String> {
    let mut ids: Vec<u32> = vms.iter().map(|v| v.id.0).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut names: Vec<&str> = vms
        .iter()
        .map(|v| v.name.as_str())
        // Only what the tool itself accepts as a name; that also keeps it shell-safe.
        .filter(|n| guest_spec::check_name(n).is_ok())
        .filter(|n| vms.iter().filter(|v| v.name == *n).count() == 1)
        .collect();
    names.sort_unstable();
    ids.into_iter()
        .map(|id| format!("vm{id}"))
        .chain(names.into_iter().map(str::to_string))
        .collect()
}

/// The candidates of the monitor at `socket`, or none on any error.
pub fn live_candidates(socket: &Path) -> Vec<String> {
    let opts = ClientOptions {
        handshake_timeout: LIVE_TIMEOUT,
        request_timeout: LIVE_TIMEOUT,
        ..ClientOptions::default()
    };
    Client::connect_with(socket, opts)
        .and_then(|mut c| c.list())
        .map(|vms| candidates(&vms))
        .unwrap_or_default()
}

/// Where the VM arguments are: for each subcommand that has any, the indexes among its
/// positional arguments of the VM ones; and every option that takes a value (skipped with its
/// value when the glue counts positional arguments).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSlots {
    /// (subcommand, indexes of its VM arguments among its positionals), in definition order.
    pub commands: Vec<(String, Vec<usize>)>,
    /// `--long` and `-s` spellings of the options that take a value, sorted.
    pub value_options: Vec<String>,
}

/// Whether a positional argument with this id is a VM (the tool names them `vm`, `vm1`, `vm2`).
fn is_vm_arg(id: &str) -> bool {
    id.strip_prefix("vm")
        .is_some_and(|rest| rest.bytes().all(|b| b.is_ascii_digit()))
}

/// The [`VmSlots`] of `cmd` (the tool's clap definition).
pub fn vm_slots(cmd: &Command) -> VmSlots {
    let mut commands = Vec::new();
    let mut value_options = Vec::new();
    let mut options = |c: &Command| {
        for a in c.get_arguments().filter(|a| !a.is_positional()) {
            if a.get_action().takes_values() {
                value_options.extend(a.get_long().map(|l| format!("--{l}")));
                value_options.extend(a.get_short().map(|s| format!("-{s}")));
            }
        }
    };
    options(cmd);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        options(sub);
        let slots: Vec<usize> = sub
            .get_positionals()
            .enumerate()
            .filter(|(_, a)| is_vm_arg(a.get_id().as_str()))
            .map(|(i, _)| i)
            .collect();
        if !slots.is_empty() {
            commands.push((sub.get_name().to_string(), slots));
        }
    }
    value_options.sort();
    value_options.dedup();
    VmSlots {
        commands,
        value_options,
    }
}

impl VmSlots {
    /// The subcommands grouped by their slots, in order of first appearance.
    fn groups(&self) -> Vec<(Vec<&str>, &[usize])> {
        let mut groups: Vec<(Vec<&str>, &[usize])> = Vec::new();
        for (name, slots) in &self.commands {
            match groups.iter_mut().find(|(_, s)| *s == slots.as_slice()) {
                Some((names, _)) => names.push(name),
                None => groups.push((vec![name], slots)),
            }
        }
        groups
    }

    fn slot_list(slots: &[usize]) -> String {
        let s: Vec<String> = slots.iter().map(usize::to_string).collect();
        s.join(" ")
    }

    /// `case` arms (bash and zsh) that set `slots` to " 0 1 " for the subcommand in `$sub`.
    fn sh_arms(&self) -> String {
        self.groups()
            .iter()
            .map(|(names, slots)| {
                format!(
                    "        {}) slots=\" {} \" ;;\n",
                    names.join("|"),
                    Self::slot_list(slots)
                )
            })
            .collect()
    }

    fn fish_arms(&self) -> String {
        self.groups()
            .iter()
            .map(|(names, slots)| {
                format!(
                    "        case {}\n            contains -- $pos {}; and return 0\n",
                    names.join(" "),
                    Self::slot_list(slots)
                )
            })
            .collect()
    }
}

const BASH_GLUE: &str = r#"
# Live VMs for VM arguments, ahead of clap_complete's _vmfork above (vmfork's own glue:
# clap_complete's dynamic completion is unstable; see tools/vmfork/src/complete.rs).
_vmfork_vms() {
    local cur="${COMP_WORDS[COMP_CWORD]}" sub="" slots="" pos=0 i w
    local -a sock=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${COMP_WORDS[i]}"
        case "$w" in
            @OPTS@)
                # `--opt=value` arrives as three words.
                [[ "${COMP_WORDS[i+1]}" == "=" ]] && ((i++))
                ((i++))
                [[ "$w" == --socket ]] && sock=(--socket "${COMP_WORDS[i]}")
                continue ;;
            -*) continue ;;
        esac
        if [[ -z "$sub" ]]; then sub="$w"; else ((pos++)); fi
    done
    case "$sub" in
@ARMS@    esac
    if [[ "$slots" == *" $pos "* && "$cur" != -* ]]; then
        compopt +o default +o bashdefault 2>/dev/null
        COMPREPLY=($(compgen -W "$("${COMP_WORDS[0]}" "${sock[@]}" __complete-vms 2>/dev/null)" -- "$cur"))
        return 0
    fi
    _vmfork "$@"
}
if [[ "${BASH_VERSINFO[0]}" -eq 4 && "${BASH_VERSINFO[1]}" -ge 4 || "${BASH_VERSINFO[0]}" -gt 4 ]]; then
    complete -F _vmfork_vms -o nosort -o bashdefault -o default vmfork
else
    complete -F _vmfork_vms -o bashdefault -o default vmfork
fi
"#;

const ZSH_GLUE: &str = r#"
# Live VMs for VM arguments, ahead of clap_complete's _vmfork above (vmfork's own glue:
# clap_complete's dynamic completion is unstable; see tools/vmfork/src/complete.rs).
_vmfork_vms() {
    local sub="" slots="" w
    local -i i pos=0
    local -a sock vms
    for ((i = 2; i < CURRENT; i++)); do
        w="${words[i]}"
        case "$w" in
            @OPTS@)
                (( i++ ))
                [[ "$w" == --socket ]] && sock=(--socket "${words[i]}")
                continue ;;
            -*) continue ;;
        esac
        if [[ -z "$sub" ]]; then sub="$w"; else (( pos++ )); fi
    done
    case "$sub" in
@ARMS@    esac
    if [[ "$slots" == *" $pos "* && "${words[CURRENT]}" != -* ]]; then
        vms=(${(f)"$("${words[1]}" "${sock[@]}" __complete-vms 2>/dev/null)"})
        compadd -a vms
        return
    fi
    _vmfork "$@"
}

if [ "$funcstack[1]" = "_vmfork" ]; then
    compdef _vmfork_vms vmfork
    _vmfork_vms "$@"
else
    compdef _vmfork_vms vmfork
fi
"#;

/// The end of clap_complete's zsh script, which the zsh glue replaces so that its own function
/// is the one called (sourced or autoloaded from `fpath`).
const ZSH_TAIL: &str = "if [ \"$funcstack[1]\" = \"_vmfork\" ]; then";

const FISH_GLUE: &str = r#"
# Live VMs for VM arguments (vmfork's own glue: clap_complete's dynamic completion is
# unstable; see tools/vmfork/src/complete.rs).
function __vmfork_vm_arg
    set -l sub
    set -l pos 0
    set -l skip 0
    set -l tokens (commandline -opc)
    set -e tokens[1]
    for w in $tokens
        if test $skip -eq 1
            set skip 0
            continue
        end
        switch $w
            case @OPTS@
                set skip 1
                continue
            case '-*'
                continue
        end
        if test -z "$sub"
            set sub $w
        else
            set pos (math $pos + 1)
        end
    end
    switch "$sub"
@ARMS@    end
    return 1
end
function __vmfork_vms
    set -l tokens (commandline -opc)
    set -l sock
    set -l i (contains -i -- --socket $tokens)
    if test -n "$i"
        set sock --socket $tokens[(math $i + 1)]
    end
    $tokens[1] $sock __complete-vms 2>/dev/null
end
complete -c vmfork -n __vmfork_vm_arg -f -a '(__vmfork_vms)'
"#;

/// The completion script for `shell`: clap_complete's for `cmd` (named `vmfork`), then, for
/// bash, zsh and fish, the glue that completes VM arguments with the live VMs.
pub fn script(shell: Shell, cmd: &mut Command) -> String {
    let mut out = Vec::new();
    clap_complete::generate(shell, cmd, "vmfork", &mut out);
    let mut text = String::from_utf8_lossy(&out).into_owned();
    let slots = vm_slots(cmd);
    let opts = |sep: &str| slots.value_options.join(sep);
    match shell {
        Shell::Bash => {
            text.push_str(
                &BASH_GLUE
                    .replace("@OPTS@", &opts("|"))
                    .replace("@ARMS@", &slots.sh_arms()),
            );
        }
        Shell::Zsh => {
            let glue = ZSH_GLUE
                .replace("@OPTS@", &opts("|"))
                .replace("@ARMS@", &slots.sh_arms());
            match text.rfind(ZSH_TAIL) {
                Some(at) => text.truncate(at),
                // Another clap_complete: keep its ending, ours registers after it.
                None => text.push('\n'),
            }
            text.push_str(&glue);
        }
        Shell::Fish => {
            text.push_str(
                &FISH_GLUE
                    .replace("@OPTS@", &opts(" "))
                    .replace("@ARMS@", &slots.fish_arms()),
            );
        }
        _ => {}
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};
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
    fn candidates_are_ids_then_unique_valid_names() {
        let vms = [
            vm(4, "linux"),
            vm(1, "counter"),
            vm(2, "counter.1"),
            vm(5, "linux"),
            vm(7, "bad name"),
        ];
        assert_eq!(
            candidates(&vms),
            ["vm1", "vm2", "vm4", "vm5", "vm7", "counter", "counter.1"]
        );
        assert!(candidates(&[]).is_empty());
    }

    #[test]
    fn no_monitor_gives_no_candidates() {
        let dir = std::env::temp_dir().join(format!("vmfork-complete-{}", std::process::id()));
        assert!(live_candidates(&dir.join("none.sock")).is_empty());
    }

    fn toy() -> Command {
        let vm = |id: &'static str| Arg::new(id).required(true);
        Command::new("vmfork")
            .arg(Arg::new("socket").long("socket").global(true))
            .arg(Arg::new("json").long("json").action(ArgAction::SetTrue))
            .subcommand(Command::new("list"))
            .subcommand(
                Command::new("fork")
                    .arg(vm("vm"))
                    .arg(Arg::new("count").long("count").short('n')),
            )
            .subcommand(Command::new("pause").arg(vm("vm")))
            .subcommand(Command::new("dump").arg(vm("vm")).arg(Arg::new("file")))
            .subcommand(Command::new("diff").arg(vm("vm1")).arg(vm("vm2")))
            .subcommand(Command::new("restore").arg(Arg::new("file")))
            .subcommand(Command::new("hidden").hide(true).arg(vm("vm")))
    }

    #[test]
    fn slots_are_the_vm_positionals() {
        let s = vm_slots(&toy());
        let expect: Vec<(String, Vec<usize>)> = [
            ("fork", vec![0]),
            ("pause", vec![0]),
            ("dump", vec![0]),
            ("diff", vec![0, 1]),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
        assert_eq!(s.commands, expect);
        assert_eq!(s.value_options, ["--count", "--socket", "-n"]);
        assert_eq!(
            s.sh_arms(),
            "        fork|pause|dump) slots=\" 0 \" ;;\n        diff) slots=\" 0 1 \" ;;\n"
        );
        assert!(s
            .fish_arms()
            .contains("case diff\n            contains -- $pos 0 1; and return 0\n"));
    }

    #[test]
    fn scripts_call_the_hidden_subcommand_for_vm_arguments() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let s = script(shell, &mut toy());
            assert!(s.contains(SUBCOMMAND), "{shell}");
            assert!(!s.contains("@OPTS@") && !s.contains("@ARMS@"), "{shell}");
            assert!(s.contains("--count|--socket|-n") || shell == Shell::Fish);
        }
        let bash = script(Shell::Bash, &mut toy());
        assert!(bash.contains("complete -F _vmfork_vms -o nosort"));
        assert!(bash.contains("fork|pause|dump) slots=\" 0 \" ;;"));
        // zsh: clap's ending is replaced, so ours is what both sourcing and fpath call.
        let zsh = script(Shell::Zsh, &mut toy());
        assert!(!zsh.contains("compdef _vmfork vmfork"), "{zsh}");
        assert_eq!(zsh.matches(ZSH_TAIL).count(), 1);
        assert!(zsh.trim_end().ends_with("compdef _vmfork_vms vmfork\nfi"));
        let fish = script(Shell::Fish, &mut toy());
        assert!(fish.contains("case --count --socket -n"));
        assert!(fish.contains("complete -c vmfork -n __vmfork_vm_arg -f -a '(__vmfork_vms)'"));
        // Other shells get clap's script as it is.
        let mut plain = Vec::new();
        clap_complete::generate(Shell::Elvish, &mut toy(), "vmfork", &mut plain);
        assert_eq!(
            script(Shell::Elvish, &mut toy()),
            String::from_utf8(plain).unwrap()
        );
    }
}
