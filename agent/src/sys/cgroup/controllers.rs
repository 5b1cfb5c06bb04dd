//! cgroup v2 controllers by name, and sets of them as `cgroup.controllers` and
//! `cgroup.subtree_control` list them.

use std::fmt;

/// A cgroup v2 controller corral knows by name. Others in `cgroup.controllers` are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Controller {
    Memory,
    Pids,
    Cpu,
    Io,
    Cpuset,
    Hugetlb,
    Rdma,
    Misc,
}

impl Controller {
    pub const ALL: [Controller; 8] = [
        Controller::Memory,
        Controller::Pids,
        Controller::Cpu,
        Controller::Io,
        Controller::Cpuset,
        Controller::Hugetlb,
        Controller::Rdma,
        Controller::Misc,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
            Controller::Io => "io",
            Controller::Cpuset => "cpuset",
            Controller::Hugetlb => "hugetlb",
            Controller::Rdma => "rdma",
            Controller::Misc => "misc",
        }
    }

    pub fn from_name(name: &str) -> Option<Controller> {
        Controller::ALL.into_iter().find(|c| c.name() == name)
    }

    fn bit(self) -> u16 {
        1 << self as u16
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of controllers, iterated in [`Controller::ALL`] order.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Controllers(u16);

impl Controllers {
    pub const NONE: Controllers = Controllers(0);

    /// The names in a `cgroup.controllers` or `cgroup.subtree_control` file; unknown names are
    /// ignored.
    pub fn parse(text: &str) -> Controllers {
        text.split_whitespace()
            .filter_map(Controller::from_name)
            .collect()
    }

    pub fn contains(self, c: Controller) -> bool {
        self.0 & c.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Those in both sets.
    pub fn and(self, other: Controllers) -> Controllers {
        Controllers(self.0 & other.0)
    }

    /// Those in `self` but not in `other`.
    pub fn without(self, other: Controllers) -> Controllers {
        Controllers(self.0 & !other.0)
    }

    pub fn iter(self) -> impl Iterator<Item = Controller> {
        Controller::ALL
            .into_iter()
            .filter(move |c| self.contains(*c))
    }

    /// What to write to `cgroup.subtree_control` to enable these: `+memory +pids +cpu`.
    pub(super) fn enable_line(self) -> String {
        self.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl FromIterator<Controller> for Controllers {
    fn from_iter<I: IntoIterator<Item = Controller>>(iter: I) -> Controllers {
        Controllers(iter.into_iter().fold(0, |acc, c| acc | c.bit()))
    }
}

impl fmt::Display for Controllers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<_> = self.iter().map(Controller::name).collect();
        f.write_str(&names.join(" "))
    }
}

impl fmt::Debug for Controllers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controllers() {
        let c = Controllers::parse("cpuset cpu io memory hugetlb pids rdma misc dmem\n");
        assert!(c.contains(Controller::Memory) && c.contains(Controller::Misc));
        assert_eq!(Controllers::parse("").to_string(), "none");
        let mp = Controllers::parse("pids memory");
        assert_eq!(mp.to_string(), "memory pids");
        assert_eq!(mp.enable_line(), "+memory +pids");
        let cpu: Controllers = [Controller::Cpu].into_iter().collect();
        assert_eq!(c.and(mp), mp);
        assert_eq!(mp.without(Controllers::parse("memory")).to_string(), "pids");
        assert!(mp.and(cpu).is_empty());
    }
}
