//! One streamed request timed against a phase's clock, and what a phase of them measures.

use std::time::Instant;

use anyhow::Context;
use vlm_proto::generate_response::Kind;
use vlm_proto::CacheStatus;

use super::Client;

/// One streamed request, timed against a phase's clock (seconds).
pub(super) struct Stream {
    pub sent: f64,
    /// Arrival time and token count of every delta that carries tokens.
    pub arrivals: Vec<(f64, usize)>,
    /// When the final message arrived.
    pub done: f64,
    pub usage: vlm_proto::Usage,
    pub prefill_ms: f64,
}

impl Stream {
    pub fn tokens(&self) -> usize {
        self.arrivals.iter().map(|a| a.1).sum()
    }

    /// Seconds to the first token; a stream that produced none (end-of-sequence first) counts
    /// its end, when prefill was over too.
    pub fn ttft(&self) -> f64 {
        self.arrivals.first().map_or(self.done, |a| a.0) - self.sent
    }

    /// [first token, last token], if there was a token.
    fn decoding(&self) -> Option<(f64, f64)> {
        Some((self.arrivals.first()?.0, self.arrivals.last()?.0))
    }

    /// Per-token gaps in ms between consecutive deltas both inside `[from, to]` (see the module
    /// doc): a delta with k tokens arriving dt after the previous one adds k samples of dt / k.
    fn gaps_ms(&self, from: f64, to: f64, out: &mut Vec<f64>) {
        for w in self.arrivals.windows(2) {
            if w[0].0 < from || w[1].0 > to {
                continue;
            }
            let (dt, k) = (w[1].0 - w[0].0, w[1].1);
            out.extend(std::iter::repeat_n(dt * 1e3 / k as f64, k));
        }
    }

    /// Tokens that arrived in `(from, to]`.
    fn tokens_in(&self, from: f64, to: f64) -> usize {
        self.arrivals
            .iter()
            .filter(|a| a.0 > from && a.0 <= to)
            .map(|a| a.1)
            .sum()
    }
}

/// The feature-cache status every measured request must report.
#[derive(Clone, Copy)]
pub(super) enum Expect {
    /// Any (the warm-up, which stores the image's features).
    Any,
    /// A hit: the encoder did not run, so only the decoder is measured.
    Hit,
}

/// Sends one greedy request and times its deltas against `clock`.
pub(super) async fn generate(
    mut client: Client,
    image: Vec<u8>,
    prompt: String,
    max_tokens: u32,
    clock: Instant,
    expect: Expect,
) -> anyhow::Result<Stream> {
    let req = crate::bench::greedy_request(image, prompt, max_tokens);
    let sent = clock.elapsed().as_secs_f64();
    let mut stream = client.generate(req).await?.into_inner();
    let mut arrivals = Vec::new();
    let mut fin = None;
    while let Some(msg) = stream.message().await? {
        let now = clock.elapsed().as_secs_f64();
        match msg.kind {
            Some(Kind::Delta(d)) if !d.token_ids.is_empty() => {
                arrivals.push((now, d.token_ids.len()))
            }
            Some(Kind::Final(f)) => fin = Some((now, f)),
            _ => {}
        }
    }
    let (done, f) = fin.context("the stream ended without a final message")?;
    let timings = f.timings.unwrap_or_default();
    let cache: Vec<CacheStatus> = timings.cache().collect();
    if let Expect::Hit = expect {
        anyhow::ensure!(
            !cache.is_empty() && cache.iter().all(|c| *c == CacheStatus::Hit),
            "the mesh reported cache statuses {cache:?}; this benchmark needs the image's \
             features cached (a hit) so that only the decoder is measured"
        );
    }
    Ok(Stream {
        sent,
        arrivals,
        done,
        usage: f.usage.context("the final message has no usage")?,
        prefill_ms: timings.prefill_ms,
    })
}

/// Length of the union of intervals.
fn union_len(mut spans: Vec<(f64, f64)>) -> f64 {
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut total = 0.0;
    let mut cur: Option<(f64, f64)> = None;
    for (a, b) in spans {
        match cur {
            Some((ca, cb)) if a <= cb => cur = Some((ca, cb.max(b))),
            Some((ca, cb)) => {
                total += cb - ca;
                cur = Some((a, b));
            }
            None => cur = Some((a, b)),
        }
    }
    total + cur.map_or(0.0, |(a, b)| b - a)
}

/// The steady state of streams sent together: from the last stream's first token to the first
/// stream's last token, every stream was decoding. `None` if there was no such time.
fn steady_window(streams: &[Stream]) -> Option<(f64, f64)> {
    let spans: Vec<(f64, f64)> = streams.iter().filter_map(Stream::decoding).collect();
    if spans.len() < streams.len() {
        return None;
    }
    let from = spans.iter().map(|s| s.0).fold(f64::NEG_INFINITY, f64::max);
    let to = spans.iter().map(|s| s.1).fold(f64::INFINITY, f64::min);
    (to > from).then_some((from, to))
}

/// Samples of one phase (at once, or one at a time) of one level, over all rounds.
#[derive(Default)]
pub(super) struct Phase {
    /// Decode tokens/s while every stream of the round was decoding (at once: the steady window;
    /// one at a time: each stream's own decode time), one sample per round that had such a time.
    pub steady_tok_per_s: Vec<f64>,
    /// Inter-token latency inside those windows.
    pub steady_itl_ms: Vec<f64>,
    /// Decode tokens after each stream's first over the time any stream was decoding (arrivals,
    /// prefills and the steady state together), one sample per round.
    pub busy_tok_per_s: Vec<f64>,
    /// Inter-token latency of every token of every stream.
    pub itl_ms: Vec<f64>,
    pub ttft_ms: Vec<f64>,
    pub tokens: u64,
    /// Rounds measured, and rounds in which no time had every stream decoding (one stream ended
    /// before another's first token).
    pub rounds: usize,
    pub rounds_without_steady_window: usize,
}

impl Phase {
    /// A round of streams sent together.
    pub fn add_at_once(&mut self, streams: &[Stream]) -> anyhow::Result<()> {
        self.add_busy(streams)?;
        match steady_window(streams) {
            Some((from, to)) => {
                let tokens: usize = streams.iter().map(|s| s.tokens_in(from, to)).sum();
                self.steady_tok_per_s.push(tokens as f64 / (to - from));
                for s in streams {
                    s.gaps_ms(from, to, &mut self.steady_itl_ms);
                }
            }
            None => self.rounds_without_steady_window += 1,
        }
        Ok(())
    }

    /// A round of streams sent one after another: each one's decode time is its steady state.
    pub fn add_one_at_a_time(&mut self, streams: &[Stream]) -> anyhow::Result<()> {
        let rate = self.add_busy(streams)?;
        self.steady_tok_per_s.push(rate);
        for s in streams {
            s.gaps_ms(f64::NEG_INFINITY, f64::INFINITY, &mut self.steady_itl_ms);
        }
        Ok(())
    }

    /// Records the busy-time throughput, every gap and TTFT; returns the throughput.
    fn add_busy(&mut self, streams: &[Stream]) -> anyhow::Result<f64> {
        let decode_tokens: usize = streams.iter().map(|s| s.tokens().saturating_sub(1)).sum();
        let busy = union_len(streams.iter().filter_map(Stream::decoding).collect());
        anyhow::ensure!(
            decode_tokens > 0 && busy > 0.0,
            "no stream produced a second token (every answer ended at once); \
             this measurement needs --max-tokens ≥ 2 and answers that do not end at the first token"
        );
        let rate = decode_tokens as f64 / busy;
        self.busy_tok_per_s.push(rate);
        for s in streams {
            s.gaps_ms(f64::NEG_INFINITY, f64::INFINITY, &mut self.itl_ms);
            self.ttft_ms.push(s.ttft() * 1e3);
            self.tokens += s.tokens() as u64;
        }
        self.rounds += 1;
        Ok(rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(arrivals: &[(f64, usize)]) -> Stream {
        Stream {
            sent: 0.0,
            arrivals: arrivals.to_vec(),
            done: 10.0,
            usage: Default::default(),
            prefill_ms: 0.0,
        }
    }

    #[test]
    fn union_of_spans() {
        assert_eq!(union_len(vec![]), 0.0);
        assert_eq!(union_len(vec![(0.0, 1.0), (2.0, 3.0)]), 2.0);
        assert_eq!(union_len(vec![(2.0, 4.0), (0.0, 3.0), (5.0, 5.5)]), 4.5);
    }

    #[test]
    fn gaps_count_tokens_not_messages() {
        let s = stream(&[(1.0, 1), (1.5, 1), (2.5, 2)]);
        let mut gaps = Vec::new();
        s.gaps_ms(f64::NEG_INFINITY, f64::INFINITY, &mut gaps);
        assert_eq!(gaps, [500.0, 500.0, 500.0]);
        gaps.clear();
        s.gaps_ms(1.2, 3.0, &mut gaps);
        assert_eq!(gaps, [500.0, 500.0], "only the gap with both ends inside");
        assert_eq!(s.tokens(), 4);
        assert_eq!(s.ttft(), 1.0);
    }

    #[test]
    fn one_at_a_time_throughput_is_decode_tokens_over_decode_time() {
        // Two streams one after the other: 3 + 1 decode tokens over 1 + 1 s busy.
        let mut p = Phase::default();
        p.add_one_at_a_time(&[
            stream(&[(0.0, 1), (0.5, 1), (1.0, 2)]),
            stream(&[(3.0, 1), (4.0, 1)]),
        ])
        .unwrap();
        assert_eq!(p.busy_tok_per_s, [2.0]);
        assert_eq!(p.steady_tok_per_s, [2.0]);
        assert_eq!(p.tokens, 6);
        // A phase in which no stream got past its first token cannot be measured.
        assert!(Phase::default()
            .add_one_at_a_time(&[stream(&[(1.0, 1)])])
            .is_err());
    }

    #[test]
    fn at_once_steady_state_counts_only_the_time_every_stream_decoded() {
        // A decodes from 0 s; B's first token comes at 2 s (its prefill stalled A: a 1.5 s gap);
        // both decode a token every 0.5 s until A ends at 4 s.
        let a = stream(&[
            (0.0, 1),
            (0.5, 1),
            (2.0, 1),
            (2.5, 1),
            (3.0, 1),
            (3.5, 1),
            (4.0, 1),
        ]);
        let b = stream(&[(2.0, 1), (2.5, 1), (3.0, 1), (3.5, 1), (4.0, 1), (4.5, 1)]);
        let mut p = Phase::default();
        p.add_at_once(&[a, b]).unwrap();
        // In (2, 4]: 4 tokens of each over 2 s.
        assert_eq!(p.steady_tok_per_s, [4.0]);
        assert!(p.steady_itl_ms.iter().all(|&g| g == 500.0));
        assert_eq!(p.steady_itl_ms.len(), 8);
        // Over all gaps the stall shows.
        assert!(p.itl_ms.contains(&1500.0));
        // Busy: 6 + 5 decode tokens over 4.5 s.
        assert_eq!(p.busy_tok_per_s, [11.0 / 4.5]);

        // B starts after A has ended: no steady state, counted, not invented.
        let mut p = Phase::default();
        p.add_at_once(&[stream(&[(0.0, 1), (1.0, 1)]), stream(&[(2.0, 1), (3.0, 1)])])
            .unwrap();
        assert!(p.steady_tok_per_s.is_empty());
        assert_eq!((p.rounds, p.rounds_without_steady_window), (1, 1));
    }
}
