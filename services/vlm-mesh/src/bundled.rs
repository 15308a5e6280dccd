//! The bundled demo model (models/shapes-llava, about 4 MB), compiled into the binary so that
//! `vlm-mesh demo`, `up`, `generate` and `serve` work from any directory, from an installed or
//! copied binary and in the container image, with no `--model`.
//!
//! `--model` defaults to [`BUNDLED_MODEL`], a name rather than a path: it is unpacked on first use
//! into a cache directory (see [`cache_root`]) named by a digest of its files, written to a
//! temporary directory and renamed into place, so concurrent processes (the services `up` starts)
//! never see half a model.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The `--model` value that means the bundled demo model.
pub const BUNDLED_MODEL: &str = "bundled:shapes-llava";
/// The `--image` value that means the bundled sample image `demo` asks about.
pub const BUNDLED_DEMO_IMAGE: &str = "bundled:demo.png";

macro_rules! bundled {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!("../../../models/shapes-llava/", $path)) as &[u8])),*]
    };
}

/// Every file of the checkpoint the loader reads, and the demo's sample image.
const FILES: &[(&str, &[u8])] = bundled!(
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "training.json",
    "samples/demo.png",
    "samples/samples.json",
);

/// `--model` as given, with [`BUNDLED_MODEL`] unpacked and replaced by its directory.
pub fn model_dir(given: &Path) -> anyhow::Result<PathBuf> {
    if given == Path::new(BUNDLED_MODEL) {
        unpack()
    } else {
        Ok(given.to_path_buf())
    }
}

/// `--image` as given, with [`BUNDLED_DEMO_IMAGE`] unpacked and replaced by its path.
pub fn image_path(given: &Path) -> anyhow::Result<PathBuf> {
    if given == Path::new(BUNDLED_DEMO_IMAGE) {
        Ok(unpack()?.join("samples/demo.png"))
    } else {
        Ok(given.to_path_buf())
    }
}

/// Where unpacked models live: `$VLM_CACHE_DIR`, else `$XDG_CACHE_HOME/vlm-mesh`, else
/// `~/.cache/vlm-mesh`, else `<temp dir>/vlm-mesh-cache`.
pub fn cache_root() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("VLM_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("vlm-mesh")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/vlm-mesh")))
        .unwrap_or_else(|| std::env::temp_dir().join("vlm-mesh-cache"))
}

fn digest() -> String {
    let mut h = blake3::Hasher::new();
    for (name, bytes) in FILES {
        h.update(name.as_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    h.finalize().to_hex()[..16].to_string()
}

/// Unpacks the bundled model once; returns its directory.
/// The directory is `<cache>/bundled-<digest>/shapes-llava`, so the model keeps its name (the
/// gateway's model id is the directory's name).
fn unpack() -> anyhow::Result<PathBuf> {
    const NAME: &str = "shapes-llava";
    let root = cache_root();
    let dir = root.join(format!("bundled-{}", digest()));
    if dir.join(".complete").exists() {
        return Ok(dir.join(NAME));
    }
    let hint = "set VLM_CACHE_DIR to a writable directory, or pass --model DIR";
    std::fs::create_dir_all(&root).with_context(|| {
        format!(
            "cannot create {} for the bundled model; {hint}",
            root.display()
        )
    })?;
    let tmp = tempfile::Builder::new()
        .prefix(".unpacking-")
        .tempdir_in(&root)
        .with_context(|| format!("cannot write to {}; {hint}", root.display()))?;
    for (name, bytes) in FILES {
        let path = tmp.path().join(NAME).join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, bytes)
            .with_context(|| format!("cannot write {}; {hint}", path.display()))?;
    }
    std::fs::write(tmp.path().join(".complete"), b"")?;
    let tmp = tmp.keep();
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process unpacked it first: theirs is as good as ours.
        if !dir.join(".complete").exists() {
            return Err(e).with_context(|| {
                format!(
                    "cannot move the bundled model into {}; {hint}",
                    dir.display()
                )
            });
        }
    }
    Ok(dir.join(NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing the checkpoint holds is left out of the binary (a new file in models/shapes-llava
    /// must be added to FILES, or the installed binary would load a different model).
    #[test]
    fn every_top_level_checkpoint_file_is_bundled() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shapes-llava");
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            if entry.file_type().unwrap().is_file() {
                let name = entry.file_name().to_string_lossy().into_owned();
                assert!(
                    FILES.iter().any(|(n, _)| *n == name),
                    "{name} is in models/shapes-llava but not bundled"
                );
            }
        }
    }

    #[test]
    fn unpacks_once_into_the_cache_and_equals_the_checkout() {
        let cache = tempfile::tempdir().unwrap();
        // SAFETY: this test is the only one in this binary reading VLM_CACHE_DIR.
        unsafe { std::env::set_var("VLM_CACHE_DIR", cache.path()) };
        let dir = model_dir(Path::new(BUNDLED_MODEL)).unwrap();
        assert!(dir.starts_with(cache.path()));
        assert!(
            dir.ends_with("shapes-llava"),
            "the gateway's model id: {}",
            dir.display()
        );
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/shapes-llava");
        for (name, _) in FILES {
            assert_eq!(
                std::fs::read(dir.join(name)).unwrap(),
                std::fs::read(src.join(name)).unwrap(),
                "{name}"
            );
        }
        assert_eq!(model_dir(Path::new(BUNDLED_MODEL)).unwrap(), dir);
        assert_eq!(
            image_path(Path::new(BUNDLED_DEMO_IMAGE)).unwrap(),
            dir.join("samples/demo.png")
        );
        let own = Path::new("/some/checkpoint");
        assert_eq!(model_dir(own).unwrap(), own);
        unsafe { std::env::remove_var("VLM_CACHE_DIR") };
    }
}
