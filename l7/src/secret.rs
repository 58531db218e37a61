//! Secret values for `headerMatches` (`secret: {namespace, name}`).
//!
//! The proxy never reads secrets by itself: the agent supplies a [`SecretSource`]. Secrets are
//! read when a rule set is compiled (once per policy revision), so a changed secret takes effect
//! with the next compilation, and a request never waits for a file read.

use std::path::PathBuf;

use policy::model::SecretRef;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret {0}: not found")]
    NotFound(String),
    #[error("secret {name}: reading {path}: {source}")]
    Read {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secret {0}: value is not valid UTF-8 text")]
    NotText(String),
}

/// Where `headerMatches` secrets come from.
pub trait SecretSource: Send + Sync {
    /// The secret's value, without a trailing newline.
    fn secret(&self, secret: &SecretRef) -> Result<String, SecretError>;
}

/// Secrets as files in a directory: `DIR/NAMESPACE/NAME` for a namespaced reference, `DIR/NAME`
/// otherwise (the layout of a mounted Kubernetes secret volume per namespace). One trailing
/// newline is stripped, since editors add one.
#[derive(Debug, Clone)]
pub struct SecretDir {
    dir: PathBuf,
}

impl SecretDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SecretDir { dir: dir.into() }
    }
}

/// Display form of a reference: `namespace/name` or `name`.
pub fn secret_display(secret: &SecretRef) -> String {
    match &secret.namespace {
        Some(ns) => format!("{ns}/{}", secret.name),
        None => secret.name.clone(),
    }
}

fn safe_component(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
}

impl SecretSource for SecretDir {
    fn secret(&self, secret: &SecretRef) -> Result<String, SecretError> {
        let display = secret_display(secret);
        // A reference must not walk out of the directory.
        let mut path = self.dir.clone();
        if let Some(ns) = &secret.namespace {
            if !safe_component(ns) {
                return Err(SecretError::NotFound(display));
            }
            path.push(ns);
        }
        if !safe_component(&secret.name) {
            return Err(SecretError::NotFound(display));
        }
        path.push(&secret.name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SecretError::NotFound(display))
            }
            Err(source) => {
                return Err(SecretError::Read {
                    name: display,
                    path,
                    source,
                })
            }
        };
        let mut text = String::from_utf8(bytes).map_err(|_| SecretError::NotText(display))?;
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_namespaced_and_plain_secrets() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("prod")).unwrap();
        std::fs::write(dir.path().join("prod/token"), "s3cr3t\n").unwrap();
        std::fs::write(dir.path().join("plain"), "v").unwrap();
        let src = SecretDir::new(dir.path());
        let r = |ns: Option<&str>, n: &str| SecretRef {
            namespace: ns.map(str::to_string),
            name: n.to_string(),
        };
        assert_eq!(src.secret(&r(Some("prod"), "token")).unwrap(), "s3cr3t");
        assert_eq!(src.secret(&r(None, "plain")).unwrap(), "v");
        assert!(matches!(
            src.secret(&r(None, "missing")),
            Err(SecretError::NotFound(_))
        ));
        assert!(matches!(
            src.secret(&r(Some(".."), "plain")),
            Err(SecretError::NotFound(_))
        ));
    }
}
