//! Refusing before working: whether a request's images can fit the model's context at all is
//! known before a pixel is decoded. A tiling or native-resolution model's rows per image (and
//! per region) come from the encoder's header-only plan (`Plan` with `layout_only`); other
//! models' from the decoder's fixed `image_tokens`. Rows plus the request's `max_tokens` (the
//! decoder's default when unset) beyond the context is INVALID_ARGUMENT at once, so a request
//! that can never fit costs header reads, not encodes.

use tokio::time::Instant;
use tonic::Status;
use vlm_proto::GenerateRequest;

use crate::identity::encoder_info;
use crate::images::ImageJob;
use crate::slots::Slot;
use crate::{views, Stages};

/// INVALID_ARGUMENT when the slots' rows and `max_tokens` exceed the context (the prompt's own
/// text needs at least one more position, which the decoder checks).
pub(crate) async fn check(
    stages: &Stages,
    req: &GenerateRequest,
    slots: &[Slot],
    deadline: Instant,
) -> Result<(), Status> {
    if slots.is_empty() {
        return Ok(());
    }
    let decoder = stages.identity.decoder_info(stages, deadline).await?;
    let context = u64::from(decoder.context_length);
    if context == 0 {
        return Ok(()); // a decoder that does not say: it checks itself
    }
    let rows = if encoder_info(stages, deadline).await?.tiles {
        layout_rows(stages, slots, deadline).await?
    } else {
        slots.len() as u64 * u64::from(decoder.image_tokens)
    };
    let max_tokens = req
        .params
        .as_ref()
        .and_then(|p| p.max_tokens)
        .unwrap_or(decoder.default_max_tokens);
    let needed = rows + u64::from(max_tokens);
    if needed > context {
        return Err(Status::invalid_argument(format!(
            "gateway: the request's {} images and regions take {rows} rows of the model's \
             context, which with max_tokens ({max_tokens}) exceeds its {context} positions; \
             send fewer or smaller images (or regions), or ask for fewer tokens",
            slots.len()
        )));
    }
    Ok(())
}

/// The rows of every slot from header-only plans, asked in parallel.
async fn layout_rows(stages: &Stages, slots: &[Slot], deadline: Instant) -> Result<u64, Status> {
    let plans = slots.iter().map(|s| {
        let job = ImageJob {
            image: s.image.clone(),
            region: s.region,
            monitor_layers: false,
            deadline,
        };
        async move { views::plan(stages, &job, true).await }
    });
    let plans = futures::future::try_join_all(plans).await?;
    Ok(plans.iter().map(|p| u64::from(p.packed_rows)).sum())
}
