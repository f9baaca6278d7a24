//! A physical standby of a test cluster, for failover: a cold copy of the primary's
//! data directory (stopped, copied, started again: no pg_basebackup of the server's
//! version needed) that streams from the primary through a physical slot, promoted
//! when the test fails the primary over.

use super::pg::{pg_command, run, Cluster};
use super::{free_port, temp_dir};
use std::process::Command;

impl Cluster {
    /// Starts a hot standby of this cluster streaming through the physical slot `slot`
    /// (created here), with `settings` added to its configuration.
    pub fn standby(&self, slot: &str, settings: &[(&str, &str)]) -> Cluster {
        self.psql(
            "postgres",
            &format!("SELECT pg_create_physical_replication_slot('{slot}')"),
        );
        self.stop("fast");
        let dir = temp_dir("duplex-pg-");
        let data = dir.join("data");
        let mut copy = pg_command(std::path::Path::new("/bin"), "cp");
        copy.arg("-a").arg(self.dir.join("data")).arg(&data);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(&dir);
            run(chown, "chown");
        }
        run(copy, "copying the data directory");
        self.start_server();
        let port = free_port();
        let mut conf = format!(
            "port = {port}\nunix_socket_directories = '{}'\n\
             primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=postgres'\n\
             primary_slot_name = '{slot}'\nhot_standby_feedback = on\n",
            dir.display(),
            self.port
        );
        for (k, v) in settings {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        let mut existing = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        existing.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), existing).unwrap();
        std::fs::write(data.join("standby.signal"), "").unwrap();
        let _ = std::fs::remove_file(data.join("postmaster.pid"));
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let mut chown = Command::new("chown");
            chown.args(["-R", "postgres:postgres"]).arg(&dir);
            run(chown, "chown");
        }
        let standby = Cluster {
            port,
            dir,
            bin: self.bin.clone(),
            major: self.major,
        };
        standby.start_server();
        standby
    }

    /// Promotes this standby to a primary and waits until it takes writes.
    pub fn promote(&self) {
        self.pg_ctl(&["-w", "-t", "60", "promote"]);
    }
}
