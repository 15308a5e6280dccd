//! Tests of `chat_template.rs`: rendering as transformers does, questions and turn markers.

use super::*;

/// llava-hf's LLaVA-1.5 template, the decoder's fallback (`vlm_model::chat_template`).
const LLAVA_1_5_TEMPLATE: &str =
    include_str!("../../../shared/model/src/llava_1_5_chat_template.jinja");

fn fallback() -> ChatTemplate {
    ChatTemplate::new(
        LLAVA_1_5_TEMPLATE,
        "test".into(),
        "<image>".into(),
        "<s>".into(),
        "</s>".into(),
    )
    .unwrap()
}

fn user(parts: Vec<TemplatePart>) -> TemplateMessage {
    TemplateMessage {
        role: "user".into(),
        content: parts,
        ..Default::default()
    }
}

fn text(t: &str) -> TemplatePart {
    TemplatePart::Text { text: t.into() }
}

#[test]
fn one_user_turn_with_an_image_is_the_llava_1_5_prompt() {
    let p = fallback()
        .render(&[user(vec![
            text("What is shown in this image?"),
            TemplatePart::Image,
        ])])
        .unwrap();
    // What transformers' LlavaProcessor.apply_chat_template writes for the same message
    // (its trailing space after the text included).
    assert_eq!(p, "USER: <image>\nWhat is shown in this image? ASSISTANT:");
}

#[test]
fn multi_turn_keeps_roles_images_and_order() {
    let p = fallback()
        .render(&[
            TemplateMessage {
                role: "system".into(),
                content: vec![text("Be brief.")],
                ..Default::default()
            },
            user(vec![TemplatePart::Image, text("Colour?")]),
            TemplateMessage {
                role: "assistant".into(),
                content: vec![text("Red.")],
                ..Default::default()
            },
            user(vec![TemplatePart::Image, text("And this one?")]),
        ])
        .unwrap();
    assert_eq!(
        p,
        "Be brief. USER: <image>\nColour? ASSISTANT: Red. USER: <image>\nAnd this one? ASSISTANT:"
    );
    assert_eq!(p.matches("<image>").count(), 2);
}

#[test]
fn checkpoint_templates_get_pycompat_methods_and_raise_exception() {
    let t = ChatTemplate::new(
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}\
         [{{ m.role.upper() }}]{% for c in m.content %}{% if c.type == 'image' %}{{ image_token }}{% else %}{{ c.text.strip() }}{% endif %}{% endfor %}\
         {% generation %}{% endgeneration %}{% endfor %}",
        "test".into(),
        "<img>".into(),
        "<s>".into(),
        "</s>".into(),
    )
    .unwrap();
    assert_eq!(
        t.render(&[user(vec![TemplatePart::Image, text("  hi ")])])
            .unwrap(),
        "<s>[USER]<img>hi"
    );
    let err = t
        .render(&[TemplateMessage {
            role: "tool".into(),
            content: vec![],
            ..Default::default()
        }])
        .unwrap_err();
    assert_eq!(err, "no tools");
}

#[test]
fn a_template_that_does_not_compile_is_an_error_naming_its_source() {
    let e = ChatTemplate::from_proto(&vlm_proto::ChatTemplate {
        template: "{% for %}".into(),
        source: "/m/chat_template.jinja".into(),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("/m/chat_template.jinja"), "{e}");
}

/// GLM-4.1V's own template, rendered as transformers rendered it for the fixture: images as
/// `<|begin_of_image|><|image|><|end_of_image|>`, a system string, and Open-AutoGLM's history
/// (text-only user turns, assistant turns as text).
#[test]
fn glm4v_template_renders_as_transformers_does() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-glm4v");
    let t = ChatTemplate::new(
        &std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap(),
        "chat_template.jinja".into(),
        "<|image|>".into(),
        String::new(),
        String::new(),
    )
    .unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("reference/reference.json")).unwrap(),
    )
    .unwrap();
    let parts = |content: &serde_json::Value| -> Vec<TemplatePart> {
        match content {
            serde_json::Value::String(s) => vec![text(s)],
            v => v
                .as_array()
                .unwrap()
                .iter()
                .map(|p| match p["type"].as_str().unwrap() {
                    "image" => TemplatePart::Image,
                    _ => text(p["text"].as_str().unwrap()),
                })
                .collect(),
        }
    };
    let history = &reference["templates"][0];
    let messages: Vec<TemplateMessage> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| TemplateMessage {
            role: m["role"].as_str().unwrap().into(),
            content: parts(&m["content"]),
            ..Default::default()
        })
        .collect();
    assert_eq!(
        t.render(&messages).unwrap(),
        history["prompt"].as_str().unwrap()
    );
    let two = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "two")
        .unwrap();
    let messages = [
        TemplateMessage {
            role: "system".into(),
            content: vec![text("You are a phone agent.")],
            ..Default::default()
        },
        user(vec![
            TemplatePart::Image,
            TemplatePart::Image,
            text("How many shapes are there?"),
        ]),
    ];
    assert_eq!(
        t.render(&messages).unwrap(),
        two["prompt"].as_str().unwrap()
    );
}

mod question_tests {
    use super::*;

    fn llava() -> ChatTemplate {
        ChatTemplate::new(
            include_str!("../../../shared/model/src/llava_1_5_chat_template.jinja"),
            "test".into(),
            "<image>".into(),
            "<s>".into(),
            "</s>".into(),
        )
        .unwrap()
    }

    fn glm4v() -> ChatTemplate {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-glm4v");
        ChatTemplate::new(
            &std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap(),
            "chat_template.jinja".into(),
            "<|image|>".into(),
            String::new(),
            String::new(),
        )
        .unwrap()
    }

    /// The bundled checkpoints with a LLaVA or GLM text model carry no template of their own
    /// (they get the LLaVA-1.5 fallback); only the GLM-4.1V ones have one, tiny-glm4v's. If that
    /// changes, the tests below must cover the new template.
    #[test]
    fn only_the_glm4v_fixtures_ship_a_template() {
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let glm4v = std::fs::read_to_string(models.join("tiny-glm4v/chat_template.jinja")).unwrap();
        for entry in std::fs::read_dir(&models).unwrap().flatten() {
            let dir = entry.path();
            if !dir.join("config.json").exists() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let has_own = dir.join("chat_template.jinja").exists()
                || dir.join("chat_template.json").exists()
                || std::fs::read_to_string(dir.join("tokenizer_config.json"))
                    .is_ok_and(|t| t.contains("\"chat_template\""));
            assert_eq!(has_own, name.ends_with("glm4v"), "{name}");
            if has_own {
                let own = std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap();
                assert_eq!(own, glm4v, "{name}: another template than tiny-glm4v's");
            }
        }
    }

    #[test]
    fn a_question_is_one_user_turn_with_its_images_first() {
        let t = llava();
        // The demo's prompt (DEFAULT_DEMO_PROMPT before `--question`), exactly.
        assert_eq!(
            t.render_question(1, "Describe the image.").unwrap(),
            "USER: <image>\nDescribe the image. ASSISTANT:"
        );
        assert_eq!(
            t.render_question(2, "Same?").unwrap(),
            "USER: <image>\n<image>\nSame? ASSISTANT:"
        );
        assert_eq!(t.render_question(0, "Hi").unwrap(), "USER: Hi ASSISTANT:");
        let g = glm4v();
        assert_eq!(
            g.render_question(1, "Describe the image.").unwrap(),
            "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>Describe the image.<|assistant|>\n"
        );
        assert_eq!(
            g.render_question(0, "Hi").unwrap(),
            "[gMASK]<sop><|user|>\nHi<|assistant|>\n"
        );
    }

    #[test]
    fn turn_markers_of_the_llava_fallback_and_glm4v() {
        let llava = llava().turn_markers().unwrap();
        assert_eq!(
            llava,
            TurnMarkers {
                user: "USER:".into(),
                assistant: "ASSISTANT:".into()
            }
        );
        assert!(llava
            .missing("USER: <image>\nWhere is the circle? ASSISTANT:")
            .is_empty());
        assert_eq!(
            llava.missing("<image> Describe the image."),
            ["USER:", "ASSISTANT:"]
        );
        assert_eq!(llava.missing("USER: <image>\nWhere?"), ["ASSISTANT:"]);
        assert_eq!(
            llava.lacking("USER: <image>\nWhere?").unwrap(),
            r#"the prompt has no "ASSISTANT:" (the model's chat template marks its turns with "USER:" … "ASSISTANT:")"#
        );
        assert_eq!(llava.lacking("USER: hi ASSISTANT:"), None);

        // GLM's preamble `[gMASK]<sop>` comes once, not with every user turn.
        let glm = glm4v().turn_markers().unwrap();
        assert_eq!(
            glm,
            TurnMarkers {
                user: "<|user|>".into(),
                assistant: "<|assistant|>".into()
            }
        );
        // With a system turn in front, as the reference prompts have it: nothing missing.
        assert!(glm
            .missing("[gMASK]<sop><|system|>\nYou are a phone agent.<|user|>\n<|begin_of_image|><|image|><|end_of_image|>Hi<|assistant|>\n")
            .is_empty());
        // A LLaVA-style prompt sent to GLM lacks both.
        assert_eq!(
            glm.missing("USER: <image>\nDescribe the image. ASSISTANT:"),
            ["<|user|>", "<|assistant|>"]
        );
        assert_eq!(
            glm.lacking("<|image|> hi").unwrap(),
            r#"the prompt has no "<|user|>" and no "<|assistant|>" (the model's chat template marks its turns with "<|user|>" … "<|assistant|>")"#
        );
    }

    /// ChatML with a default system turn (as Qwen2's): the system turn and the end-of-turn
    /// token before the next user turn are not part of the markers.
    #[test]
    fn turn_markers_leave_out_default_system_turns_and_turn_ends() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}\
             {% for m in messages %}<|im_start|>{{ m.role }}\n{% for c in m.content %}{% if c.type == 'image' %}<|vision|>{% else %}{{ c.text }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}\
             {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "test".into(),
            "<|vision|>".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(
            t.turn_markers().unwrap(),
            TurnMarkers {
                user: "<|im_start|>user".into(),
                assistant: "<|im_start|>assistant".into()
            }
        );
        // A template that raises on the probe, or never writes its text, has no markers.
        let raising = ChatTemplate::new(
            "{{ raise_exception('images only') }}",
            "test".into(),
            "<image>".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(raising.turn_markers(), None);
        assert_eq!(raising.render_question(1, "Hi").unwrap_err(), "images only");
    }

    #[test]
    fn the_cache_compiles_once_per_reported_template() {
        let cache = TemplateCache::default();
        let e = cache.compiled(None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal);
        let a = vlm_proto::ChatTemplate {
            template: include_str!("../../../shared/model/src/llava_1_5_chat_template.jinja")
                .into(),
            source: "built-in".into(),
            image_token: "<image>".into(),
            ..Default::default()
        };
        let first = cache.compiled(Some(&a)).unwrap();
        assert!(Arc::ptr_eq(&first, &cache.compiled(Some(&a)).unwrap()));
        let b = vlm_proto::ChatTemplate {
            image_token: "<img>".into(),
            ..a.clone()
        };
        let other = cache.compiled(Some(&b)).unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(other.image_token, "<img>");
        let broken = vlm_proto::ChatTemplate {
            template: "{% for %}".into(),
            ..a
        };
        assert_eq!(
            cache.compiled(Some(&broken)).unwrap_err().code(),
            tonic::Code::Internal
        );
    }
}
