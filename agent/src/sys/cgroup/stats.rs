//! What a worker's leaf counts: its memory events (OOM kills, `high` crossings) and usage.

use super::controllers::Controller;
use super::error::CgroupError;
use super::files::{flat_value, EventsFile, MemoryEvents};
use super::leaf::Leaf;

/// Numbers of one worker's leaf. `None` where the controller is not enabled, and for
/// memory_peak on kernels before 5.19.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafStats {
    pub memory_current: Option<u64>,
    pub memory_peak: Option<u64>,
    pub cpu_usage_usec: u64,
    pub pids_current: Option<u64>,
}

impl Leaf {
    /// The counters of `memory.events` (all 0 if the memory controller is not enabled).
    pub fn read_memory_events(&self) -> Result<MemoryEvents, CgroupError> {
        if !self.controllers.contains(Controller::Memory) {
            return Ok(MemoryEvents::default());
        }
        Ok(MemoryEvents::parse(
            &self.node.read(EventsFile::Memory.file_name())?,
        ))
    }

    /// memory.current, memory.peak, cpu.stat usage_usec and pids.current.
    pub fn stats(&self) -> Result<LeafStats, CgroupError> {
        let number = |file: &str, text: Option<String>| -> Result<Option<u64>, CgroupError> {
            let Some(text) = text else { return Ok(None) };
            match text.trim().parse() {
                Ok(n) => Ok(Some(n)),
                Err(_) => Err(CgroupError::Parse {
                    path: self.node.file(file),
                    text,
                    reason: "expected a number",
                }),
            }
        };
        let memory = self.controllers.contains(Controller::Memory);
        let pids = self.controllers.contains(Controller::Pids);
        let (mut memory_current, mut memory_peak, mut pids_current) = (None, None, None);
        if memory {
            memory_current = number("memory.current", Some(self.node.read("memory.current")?))?;
            memory_peak = number("memory.peak", self.node.read_opt("memory.peak")?)?;
        }
        if pids {
            pids_current = number("pids.current", Some(self.node.read("pids.current")?))?;
        }
        let cpu_stat = self.node.read("cpu.stat")?;
        let cpu_usage_usec =
            flat_value(&cpu_stat, "usage_usec").ok_or_else(|| CgroupError::Parse {
                path: self.node.file("cpu.stat"),
                text: cpu_stat.clone(),
                reason: "no `usage_usec` line",
            })?;
        Ok(LeafStats {
            memory_current,
            memory_peak,
            cpu_usage_usec,
            pids_current,
        })
    }
}
