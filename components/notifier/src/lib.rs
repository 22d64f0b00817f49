//! The webhook notifier, a cron component: every tick it delivers the due entries of the
//! webhook outbox (`webhook_deliveries`), signed per Standard Webhooks, with retries and
//! backoff ([`sparkops_platform::webhooks`]). Besides the executor and the exporter, it is
//! the only component that calls hosts users choose.
//!
//! "Now" is the tick's time, so tests fire it at the times they choose.
// wit-bindgen's export glue is `unsafe` by nature.
#![allow(unsafe_code)]

use sparkops_platform::webhooks;
use sparkops_platform::work::Work;

wit_bindgen::generate!({
    path: "../wit",
    world: "fermyon:spin-cron/spin-cron",
});

struct Notifier;

impl Guest for Notifier {
    fn handle_cron_event(metadata: Metadata) -> Result<(), Error> {
        let mut ctx = Work::new(format!("notify-{}", metadata.timestamp));
        sparkops_platform::on_tick(metadata.timestamp, |now| {
            webhooks::deliver_due(&mut ctx, now)
        })
        .map_err(Error::Other)
    }
}

export!(Notifier);
