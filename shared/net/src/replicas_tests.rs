use super::*;

#[test]
fn sources_parse() {
    let s = parse_sources("https://a:1, dns://svc.ns:50051").unwrap();
    assert_eq!(
        s,
        vec![
            Source::Static("https://a:1".into()),
            Source::Dns {
                host: "svc.ns".into(),
                port: 50051
            }
        ]
    );
    assert!(parse_sources("dns://nohost").is_err());
    assert!(parse_sources(" , ").is_err());
}

#[test]
fn peak_ewma_jumps_up_and_decays_down() {
    let mut e = PeakEwma::new(Duration::from_millis(10), Duration::from_secs(1));
    let t0 = Instant::now();
    e.observe(t0, Duration::from_millis(400));
    assert!((e.estimate_ns - 400e6).abs() < 1.0, "peak taken at once");
    // A fast sample 1 s later (one time constant) pulls it most of the way down.
    e.observe(t0 + Duration::from_secs(1), Duration::from_millis(20));
    let est = e.estimate_ns / 1e6;
    assert!(est > 20.0 && est < 400.0 * 0.5, "{est}");
    // Pending calls multiply the cost, and a stuck call raises it while it waits.
    let c0 = e.cost(t0 + Duration::from_secs(1));
    e.pending.insert(1, t0);
    let c1 = e.cost(t0 + Duration::from_secs(1));
    assert!(c1 > 2.0 * c0, "{c0} {c1}");
}

#[test]
fn two_distinct_is_distinct() {
    for _ in 0..1000 {
        let (a, b) = two_distinct(2);
        assert_ne!(a, b);
        assert!(a < 2 && b < 2);
    }
}

/// A call's prefill counts on its replica from `begin_prefill` until its guard drops, whatever
/// else is counted there (the gateway's step budget reads the sum).
#[tokio::test]
async fn prefill_guards_count_positions_until_dropped() {
    let tls: TlsForHost = Arc::new(|_host: &str| Ok(None));
    let set = ReplicaSet::new(
        "decoder",
        "http://127.0.0.1:1",
        tls,
        ReplicaOptions::default(),
    )
    .unwrap();
    let r = set.replicas().pop().unwrap();
    assert_eq!(r.prefilling(), 0);
    let a = r.begin_prefill(300);
    let b = r.begin_prefill(20);
    assert_eq!(r.prefilling(), 320);
    drop(a);
    assert_eq!(r.prefilling(), 20);
    drop(b);
    assert_eq!(r.prefilling(), 0);
}
