//! The trace exporter, a cron component: every tick it sends the due entries of the trace
//! outbox (`trace_exports`) to their projects' OTLP collectors
//! ([`sparkops_platform::traces`]). It is the only component that calls collectors, so
//! only it holds the secrets master key and an open outbound allow-list besides the
//! executor.
//!
//! "Now" is the tick's time, so tests fire it at the times they choose.
// wit-bindgen's export glue is `unsafe` by nature.
#![allow(unsafe_code)]

use sparkops_platform::traces;
use sparkops_platform::work::Work;

wit_bindgen::generate!({
    path: "../wit",
    world: "fermyon:spin-cron/spin-cron",
});

struct Exporter;

impl Guest for Exporter {
    fn handle_cron_event(metadata: Metadata) -> Result<(), Error> {
        let mut ctx = Work::new(format!("export-{}", metadata.timestamp));
        sparkops_platform::on_tick(metadata.timestamp, |now| traces::export_due(&mut ctx, now))
            .map_err(Error::Other)
    }
}

export!(Exporter);
