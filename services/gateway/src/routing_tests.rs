use super::*;

fn router() -> Router {
    Router::new(RoutingConfig::default())
}

const SYSTEM: &str = "You are a phone agent. Read the screen and answer with one action. \
                      The actions are Tap, Swipe, Type, Back, Home, Wait and Finish; \
                      each takes the arguments its documentation lists.";

fn step(history: &str, image: &[u8]) -> RouteKey {
    RouteKey::new(&format!("{SYSTEM}{history}"), [image], None)
}

#[test]
fn a_later_step_goes_where_its_prefix_is() {
    let r = router();
    let loads = [(0, 0), (1, 0), (2, 0)];
    let first = step(
        &format!(" step 1: {}", "tap the search field ".repeat(8)),
        b"img1",
    );
    assert_eq!(r.decide(&first, &loads).reason, RouteReason::balanced);
    r.record(&first, 2, &[0, 1, 2]);
    // The next step resends the history: it matches replica 2 only.
    let second = step(
        &format!(
            " step 1: {} answer: do(Tap) step 2",
            "tap the search field ".repeat(8)
        ),
        b"img2",
    );
    assert_eq!(
        r.decide(&second, &loads),
        Decision {
            index: Some(2),
            reason: RouteReason::prefix
        }
    );
    // Another session's prompt shares no chunk with it... except the system prompt, which
    // every replica that saw it holds: it goes to the longest match among them.
    r.record(&step(" other", b"x"), 0, &[0, 1, 2]);
    let d = r.decide(&second, &loads);
    assert_eq!(d.index, Some(2), "{d:?}");
}

#[test]
fn an_overloaded_best_match_spills_to_the_best_within_the_bound() {
    let r = router();
    let live = [0, 1, 2, 3];
    let long = step(
        " a long shared history of many chunks .......................",
        b"i",
    );
    r.record(&long, 0, &live);
    r.record(&step("", b"j"), 1, &live); // the system prompt only
                                         // Replica 0 has 4 calls in flight of 4: the bound is ceil(1.25 × 5 / 4) = 2, and 4 is
                                         // not below the least-loaded's 0 + 2.
    let loads = [(0, 4), (1, 0), (2, 0), (3, 0)];
    assert_eq!(
        r.decide(&long, &loads),
        Decision {
            index: Some(1),
            reason: RouteReason::spilled
        }
    );
    // Within the slack (1 < 0 + 2) though over the bound (ceil(1.25 × 3 / 4) = 1): back to
    // the longest match.
    let loads = [(0, 1), (1, 0), (2, 1), (3, 0)];
    assert_eq!(r.decide(&long, &loads).index, Some(0));
}

#[test]
fn a_session_sticks_even_when_its_prompt_changes_at_the_front() {
    let r = router();
    let live = [0, 1];
    let a = RouteKey::new("first prompt of the session", [], Some("s-1"));
    r.record(&a, 1, &live);
    let b = RouteKey::new("a different front, same session", [], Some("s-1"));
    assert_eq!(
        r.decide(&b, &[(0, 0), (1, 0)]),
        Decision {
            index: Some(1),
            reason: RouteReason::affinity
        }
    );
    // Over the bound and the slack, the session is not forced onto its replica.
    let d = r.decide(&b, &[(0, 0), (1, 3)]);
    assert_ne!(d.reason, RouteReason::affinity);
    // An empty key is no session.
    assert!(RouteKey::new("x", [], Some("")).session.is_none());
}

#[test]
fn images_extend_the_key_after_the_text() {
    let a = RouteKey::new("same text", [&b"one"[..]], None);
    let b = RouteKey::new("same text", [&b"two"[..]], None);
    assert_eq!(a.chain.len(), 2);
    assert_eq!(a.chain[0], b.chain[0]);
    assert_ne!(a.chain[1], b.chain[1]);
    // A chunk's key names everything before it: the same chunk after other text differs.
    let c = RouteKey::new(
        &format!("{}{}", "p".repeat(CHUNK_BYTES), "q".repeat(CHUNK_BYTES)),
        [],
        None,
    );
    let d = RouteKey::new(
        &format!("{}{}", "r".repeat(CHUNK_BYTES), "q".repeat(CHUNK_BYTES)),
        [],
        None,
    );
    assert_ne!(c.chain[1], d.chain[1]);
}

#[test]
fn balance_mode_and_gone_replicas() {
    let off = Router::new(RoutingConfig {
        mode: RoutingMode::Balance,
        balance: 1.25,
    });
    let k = step(" x", b"i");
    off.record(&k, 0, &[0]);
    assert_eq!(off.decide(&k, &[(0, 0), (1, 0)]).reason, RouteReason::off);
    let r = router();
    r.record(&k, 5, &[5, 6]);
    assert_eq!(r.decide(&k, &[(5, 0), (6, 0)]).index, Some(0));
    // Replica 5 left the set: what it held is forgotten.
    r.record(&step(" y", b"j"), 6, &[6]);
    assert_eq!(r.decide(&k, &[(6, 0), (7, 0)]).index, Some(0));
    assert!(!r.state.lock().unwrap().held.contains_key(&5));
}

#[test]
fn the_session_metadata_is_bounded_and_ascii() {
    let mut m = tonic::metadata::MetadataMap::new();
    assert_eq!(session_of(&m).unwrap(), None);
    m.insert("session_id", "s-9".parse().unwrap());
    assert_eq!(session_of(&m).unwrap().as_deref(), Some("s-9"));
    m.insert(SESSION_METADATA, "s-1".parse().unwrap());
    assert_eq!(
        session_of(&m).unwrap().as_deref(),
        Some("s-1"),
        "session-id wins"
    );
    m.insert(
        SESSION_METADATA,
        "x".repeat(MAX_SESSION_BYTES + 1).parse().unwrap(),
    );
    let e = session_of(&m).unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("`session-id`"), "{e:?}");
    let mut m = tonic::metadata::MetadataMap::new();
    m.insert(
        SESSION_METADATA,
        tonic::metadata::MetadataValue::try_from(&b"caf\xc3\xa9"[..]).unwrap(),
    );
    assert!(session_of(&m)
        .unwrap_err()
        .message()
        .contains("visible ASCII"));
}
