//! The projector service: feature chunks in, embedding chunks out, one output chunk per input chunk
//! (row-wise), so downstream work starts before the whole tensor has arrived.
//! Loads only `multi_modal_projector.*` from the checkpoint.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use vlm_model::{Checkpoint, DType, Device, Projector as ProjectorModel, Quantization, Tensor};
use vlm_proto::projector_server::{Projector, ProjectorServer};
use vlm_proto::{ProjectorInfo, ProjectorInfoRequest, TensorChunk};
use vlm_serving::{from_model_tensor, run_model};
use vlm_tensor::{TensorAssembler, TensorLimits, TensorStreamWriter};

#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    pub model: PathBuf,
    pub dtype: DType,
    /// How the two linear layers are stored (`--quantize`).
    pub quantization: Quantization,
    pub limits: TensorLimits,
    /// Chunks projected at the same time across all streams.
    pub max_concurrent: usize,
    /// Test-only fault hook: a pause after each projected block is sent, before the next block
    /// (or the end of the stream), so a test can kill a projector mid-stream.
    pub fault_project_delay: Option<std::time::Duration>,
}

/// One LLaVA-NeXT image in flight: its views are projected block by block as they arrive, then
/// packed (tiles stitched, padding cut, a newline per row) once the last one is in.
struct Tiled {
    layout: vlm_model::ImageLayout,
    views: usize,
    rows_per_view: usize,
    dtype: vlm_tensor::WireDType,
    chunk_rows: u32,
    projected: Vec<f32>,
}

impl Tiled {
    fn new(
        layout: &vlm_proto::ImageLayout,
        meta: &vlm_tensor::TensorMeta,
        in_dim: usize,
        chunk_rows: u32,
    ) -> Result<Self, Status> {
        let layout = vlm_serving::layout_from_proto(layout)?;
        let shape = meta.shape();
        if shape.len() != 3 || shape[0] != layout.num_views() || shape[2] != in_dim {
            return Err(Status::invalid_argument(format!(
                "a {}x{}-tile image needs projector input [{}, rows, {in_dim}], got {shape:?}",
                layout.grid.map_or(0, |g| g.rows),
                layout.grid.map_or(0, |g| g.cols),
                layout.num_views()
            )));
        }
        Ok(Tiled {
            layout,
            views: shape[0],
            rows_per_view: shape[1],
            dtype: meta.dtype(),
            chunk_rows,
            projected: Vec::new(),
        })
    }

    /// The packed `[rows, out_dim]` embeddings, the wire dtype and chunk rows to send them in.
    fn pack(
        self,
        model: &ProjectorModel,
        device: &Device,
    ) -> vlm_model::Result<(Tensor, vlm_tensor::WireDType, u32)> {
        let views = Tensor::from_vec(
            self.projected,
            (self.views, self.rows_per_view, model.out_dim()),
            device,
        )?;
        Ok((
            model.pack(&views, &self.layout)?,
            self.dtype,
            self.chunk_rows,
        ))
    }
}

/// One Project call's work: projects each input chunk as it arrives and sends its rows on (a
/// tiled image: packs once the last chunk is in).
struct ProjectStreamTask {
    model: Arc<ProjectorModel>,
    device: Device,
    permits: Arc<Semaphore>,
    limits: TensorLimits,
    fault_delay: Option<std::time::Duration>,
    tx: mpsc::Sender<Result<TensorChunk, Status>>,
}

impl ProjectStreamTask {
    async fn run(self, mut input: Streaming<TensorChunk>) -> Result<(), Status> {
        let mut assembler = TensorAssembler::new(self.limits);
        let mut writer: Option<TensorStreamWriter> = None;
        let mut tiled: Option<Tiled> = None;
        while let Some(chunk) = input.message().await? {
            let block = assembler.push(&chunk)?;
            let meta = assembler
                .meta()
                .expect("header accepted with the first chunk")
                .clone();
            let chunk_rows = chunk.header.as_ref().map_or(0, |h| h.chunk_rows);
            let layout = chunk.header.as_ref().and_then(|h| h.layout.as_ref());
            // A tiled (LLaVA-NeXT) or native-resolution (GLM-4.1V) image's views.
            let views = |l: &&vlm_proto::ImageLayout| {
                l.grid_rows > 0 || l.grid_cols > 0 || l.token_rows > 0 || l.token_cols > 0
            };
            if let Some(l) = layout.filter(views) {
                tiled = Some(Tiled::new(l, &meta, self.model.in_dim(), chunk_rows)?);
            }
            if tiled.is_none() && (meta.shape().len() != 2 || meta.row_len() != self.model.in_dim())
            {
                return Err(Status::invalid_argument(format!(
                    "projector input must be [rows, {}], got {:?}",
                    self.model.in_dim(),
                    meta.shape()
                )));
            }
            if tiled.is_none() && writer.is_none() {
                writer = Some(TensorStreamWriter::new(
                    &[meta.rows(), self.model.out_dim()],
                    meta.dtype(),
                    chunk_rows,
                )?);
            }
            if block.rows == 0 {
                continue;
            }
            let (m, device) = (self.model.clone(), self.device.clone());
            let rows = run_model(&self.permits, move |_| {
                let x = Tensor::from_vec(block.values, (block.rows, block.row_len), &device)?;
                m.forward(&x)
            })
            .await?;
            let (_, values) = from_model_tensor(&rows)?;
            if let Some(t) = &mut tiled {
                t.projected.extend_from_slice(&values);
                continue;
            }
            let w = writer.as_mut().expect("writer made with the first chunk");
            if self.tx.send(Ok(w.write_rows(&values)?)).await.is_err() {
                return Ok(()); // the caller went away
            }
            if let Some(d) = self.fault_delay {
                tracing::info!(
                    pause_ms = d.as_millis() as u64,
                    "fault hook: block sent; pausing before the next"
                );
                tokio::time::sleep(d).await;
            }
        }
        assembler.finish()?;
        if let Some(t) = tiled {
            return self.send_packed(t).await;
        }
        match writer {
            Some(w) if w.meta().total_bytes() == 0 => {
                let mut w = w;
                let _ = self.tx.send(Ok(w.write_rows(&[])?)).await;
            }
            Some(w) => w.finish()?,
            None => {
                return Err(Status::invalid_argument(
                    "empty tensor stream (no header chunk)",
                ))
            }
        }
        Ok(())
    }

    /// Packs a tiled image's projected views and sends the packed rows.
    async fn send_packed(&self, t: Tiled) -> Result<(), Status> {
        let (m, device) = (self.model.clone(), self.device.clone());
        let packed = run_model(&self.permits, move |_| t.pack(&m, &device)).await?;
        let (shape, values) = from_model_tensor(&packed.0)?;
        let mut w = TensorStreamWriter::new(&shape, packed.1, packed.2)?;
        let per_chunk = w.meta().rows_per_chunk(0).max(1) * shape[1];
        for block in values.chunks(per_chunk) {
            if self.tx.send(Ok(w.write_rows(block)?)).await.is_err() {
                return Ok(());
            }
        }
        w.finish()?;
        Ok(())
    }
}

pub struct ProjectorService {
    model: Arc<ProjectorModel>,
    device: Device,
    permits: Arc<Semaphore>,
    limits: TensorLimits,
    fault_project_delay: Option<std::time::Duration>,
}

impl ProjectorService {
    pub fn load(cfg: &ProjectorConfig) -> anyhow::Result<Self> {
        let ckpt = Checkpoint::open(&cfg.model)?;
        let device = Device::Cpu;
        let model = ProjectorModel::load_quantized(&ckpt, cfg.dtype, &device, cfg.quantization)?;
        Ok(ProjectorService {
            model: Arc::new(model),
            device,
            permits: Arc::new(Semaphore::new(cfg.max_concurrent.max(1))),
            limits: cfg.limits,
            fault_project_delay: cfg.fault_project_delay,
        })
    }

    pub fn into_server(self) -> ProjectorServer<Self> {
        ProjectorServer::new(self)
    }
}

type ProjectStream = Pin<Box<dyn Stream<Item = Result<TensorChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Projector for ProjectorService {
    type ProjectStream = ProjectStream;

    async fn project(
        &self,
        req: Request<Streaming<TensorChunk>>,
    ) -> Result<Response<ProjectStream>, Status> {
        let input = req.into_inner();
        // One chunk of buffering: the projector works on chunk n while chunk n-1 is on the wire.
        let (tx, rx) = mpsc::channel(1);
        let stream = ProjectStreamTask {
            model: self.model.clone(),
            device: self.device.clone(),
            permits: self.permits.clone(),
            limits: self.limits,
            fault_delay: self.fault_project_delay,
            tx,
        };
        // One `project` span covers the whole stream (all row blocks), under this call's span.
        let project_span = tracing::info_span!("project");
        let started = std::time::Instant::now();
        let task = async move {
            let tx = stream.tx.clone();
            if let Err(status) = stream.run(input).await {
                let _ = tx.send(Err(status)).await;
            }
            vlm_telemetry::metrics::observe_stage("project", started.elapsed());
        };
        tokio::spawn(tracing::Instrument::instrument(task, project_span));
        Ok(vlm_net::with_fingerprint(
            Response::new(Box::pin(ReceiverStream::new(rx))),
            self.model.fingerprint(),
        ))
    }

    async fn info(
        &self,
        _req: Request<ProjectorInfoRequest>,
    ) -> Result<Response<ProjectorInfo>, Status> {
        Ok(Response::new(ProjectorInfo {
            model_fingerprint: self.model.fingerprint().to_string(),
            quantization: self.model.quantization().to_string(),
            input_dim: self.model.in_dim() as u32,
            output_dim: self.model.out_dim() as u32,
        }))
    }
}
