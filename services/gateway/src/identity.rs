//! The served model as the stages report it. The gateway reads no checkpoint: `GetModelInfo` is
//! assembled from the encoder's, projector's and decoder's `Info`, asked once and asked again
//! whenever a call's `vlm-fingerprint` response header (or an encoder `Info` answer) names other
//! weights than those known, as during a rolling upgrade.

use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tonic::Status;
use vlm_net::with_deadline;
use vlm_proto::decoder_client::DecoderClient;
use vlm_proto::encoder_client::EncoderClient;
use vlm_proto::projector_client::ProjectorClient;
use vlm_proto::{
    DecoderInfo, DecoderInfoRequest, EncoderInfo, EncoderInfoRequest, ModelInfo, ProjectorInfo,
    ProjectorInfoRequest,
};

use crate::Stages;

/// The three stages' answers.
struct Known {
    encoder: EncoderInfo,
    projector: ProjectorInfo,
    decoder: DecoderInfo,
}

pub(crate) struct Identity {
    model_id: String,
    wire_dtype: Option<vlm_proto::DType>,
    known: Mutex<Option<Arc<Known>>>,
}

impl Identity {
    pub fn new(model_id: String, wire_dtype: Option<vlm_proto::DType>) -> Self {
        Identity {
            model_id,
            wire_dtype,
            known: Mutex::new(None),
        }
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// A replica of `stage` answered with weights `fingerprint`: if they are not the ones known,
    /// forget what is known, so the next `GetModelInfo` asks the stages again.
    pub fn observe(&self, stage: &str, fingerprint: Option<&str>) {
        let Some(fp) = fingerprint else { return };
        let mut known = self.known.lock().expect("identity lock");
        let current = known.as_ref().map(|k| match stage {
            "encoder" => k.encoder.model_fingerprint.as_str(),
            "projector" => k.projector.model_fingerprint.as_str(),
            _ => k.decoder.model_fingerprint.as_str(),
        });
        if let Some(current) = current {
            if current != fp {
                tracing::info!(
                    stage,
                    from = current,
                    to = fp,
                    "a replica serves other weights; the model's identity will be asked again"
                );
                *known = None;
            }
        }
    }

    /// The model's description, from what the stages last reported (asked now if unknown).
    pub async fn model_info(
        &self,
        stages: &Stages,
        deadline: Instant,
    ) -> Result<ModelInfo, Status> {
        Ok(self.describe(&*self.known(stages, deadline).await?))
    }

    /// What the decoder last reported (asked now if unknown): its context, default max_tokens
    /// and fixed image rows.
    pub async fn decoder_info(
        &self,
        stages: &Stages,
        deadline: Instant,
    ) -> Result<DecoderInfo, Status> {
        Ok(self.known(stages, deadline).await?.decoder.clone())
    }

    async fn known(&self, stages: &Stages, deadline: Instant) -> Result<Arc<Known>, Status> {
        let cached = self.known.lock().expect("identity lock").clone();
        Ok(match cached {
            Some(k) => k,
            None => {
                let k = Arc::new(ask_stages(stages, deadline).await?);
                *self.known.lock().expect("identity lock") = Some(k.clone());
                k
            }
        })
    }

    fn describe(&self, k: &Known) -> ModelInfo {
        let (e, p, d) = (&k.encoder, &k.projector, &k.decoder);
        let mut h = blake3::Hasher::new();
        for fp in [
            &e.model_fingerprint,
            &p.model_fingerprint,
            &d.model_fingerprint,
        ] {
            h.update(&(fp.len() as u64).to_le_bytes());
            h.update(fp.as_bytes());
        }
        ModelInfo {
            model_id: self.model_id.clone(),
            vision_model_type: e.vision_model_type.clone(),
            text_model_type: d.text_model_type.clone(),
            image_tokens: d.image_tokens,
            fingerprint: h.finalize().to_hex().to_string(),
            image_size: e.image_size,
            vision_hidden_size: e.feature_dim,
            text_hidden_size: d.text_hidden_size,
            context_length: d.context_length,
            compute_dtype: self.wire_dtype.map_or(e.default_wire_dtype, |w| w as i32),
            encoder_fingerprint: e.model_fingerprint.clone(),
            projector_fingerprint: p.model_fingerprint.clone(),
            decoder_fingerprint: d.model_fingerprint.clone(),
            encoder_quantization: e.quantization.clone(),
            projector_quantization: p.quantization.clone(),
            decoder_quantization: d.quantization.clone(),
            chat_template: d.chat_template.clone(),
        }
    }
}

/// One encoder replica's `Info` (retried on others like any stage call).
pub(crate) async fn encoder_info(
    stages: &Stages,
    deadline: Instant,
) -> Result<EncoderInfo, Status> {
    stages
        .encoder
        .call(deadline)
        .unary(|lease| {
            let mut client = EncoderClient::new(lease.channel());
            async move {
                let r = client.info(with_deadline(EncoderInfoRequest {}, deadline));
                Ok(r.await?.into_inner())
            }
        })
        .await
}

async fn ask_stages(stages: &Stages, deadline: Instant) -> Result<Known, Status> {
    let (mut projector_call, mut decoder_call) = (
        stages.projector.call(deadline),
        stages.decoder.call(deadline),
    );
    let projector = projector_call.unary(|lease| {
        let mut client = ProjectorClient::new(lease.channel());
        async move {
            let r = client.info(with_deadline(ProjectorInfoRequest {}, deadline));
            Ok(r.await?.into_inner())
        }
    });
    let decoder = decoder_call.unary(|lease| {
        let mut client = DecoderClient::new(lease.channel());
        async move {
            let r = client.info(with_deadline(DecoderInfoRequest {}, deadline));
            Ok(r.await?.into_inner())
        }
    });
    let (encoder, projector, decoder) =
        tokio::try_join!(encoder_info(stages, deadline), projector, decoder)?;
    Ok(Known {
        encoder,
        projector,
        decoder,
    })
}
