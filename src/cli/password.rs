//! Where the root password comes from.
//!
//! In order: a file named on the command line (its first line), the
//! `BLOCKTREE_ROOT_PASSWORD` environment variable, a prompt on the terminal when
//! standard input is one (typed twice when it will seal new root credentials).
//! There is never a default password and a password is never echoed; it is
//! wiped from memory when dropped.

use anyhow::{Context, Result, anyhow, bail};
use blocktree_core::PrincipalId;
use blocktree_core::aead::random_fill;
use std::io::IsTerminal;
use std::path::Path;
use zeroize::Zeroizing;

use super::output::key_text;

/// The environment variable consulted when no password file is given.
pub const PASSWORD_ENV: &str = "BLOCKTREE_ROOT_PASSWORD";

/// The fewest characters accepted for a password that seals new root
/// credentials. Argon2id slows guessing down; it cannot save a four-letter word.
pub const MIN_NEW_PASSWORD_CHARS: usize = 8;

/// Random bytes in a generated password: 144 bits, 24 base64url characters.
const GENERATED_PASSWORD_BYTES: usize = 18;

/// A root password, wiped from memory when dropped.
pub type Password = Zeroizing<String>;

/// What the password is for, which decides the prompt and the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Sealing root credentials that are being created: confirmed on a terminal,
    /// and at least [`MIN_NEW_PASSWORD_CHARS`] long.
    Create,
    /// Unlocking the root credentials of this root principal.
    Unlock(PrincipalId),
}

/// The password from `file`, the environment or the terminal, or `None` when
/// none of them can supply one (no file, no variable, no terminal).
pub fn obtain(file: Option<&Path>, purpose: Purpose) -> Result<Option<Password>> {
    let password = if let Some(file) = file {
        from_file(file)?
    } else if let Some(value) = std::env::var_os(PASSWORD_ENV) {
        let value = Zeroizing::new(
            value
                .into_string()
                .map_err(|_| anyhow!("{PASSWORD_ENV} is not valid UTF-8"))?,
        );
        if value.is_empty() {
            bail!("{PASSWORD_ENV} is set but empty");
        }
        value
    } else if std::io::stdin().is_terminal() {
        prompt(purpose)?
    } else {
        return Ok(None);
    };
    if purpose == Purpose::Create {
        check_new(&password)?;
    }
    Ok(Some(password))
}

/// [`obtain`], failing with advice when no source supplies a password.
/// `file_flag` names the option that takes a password file.
pub fn require(file: Option<&Path>, purpose: Purpose, file_flag: &str) -> Result<Password> {
    obtain(file, purpose)?.ok_or_else(|| {
        anyhow!("no root password: pass {file_flag} or set {PASSWORD_ENV}, or run on a terminal")
    })
}

/// A fresh random password of 144 bits, as unpadded base64url.
pub fn generate() -> Result<Password> {
    let mut bytes = Zeroizing::new([0u8; GENERATED_PASSWORD_BYTES]);
    random_fill(bytes.as_mut()).context("cannot generate a root password")?;
    Ok(Zeroizing::new(key_text(bytes.as_ref())))
}

/// The first line of `file`, without its line ending.
fn from_file(file: &Path) -> Result<Password> {
    let bytes = Zeroizing::new(
        std::fs::read(file)
            .with_context(|| format!("cannot read password file {}", file.display()))?,
    );
    let line = bytes
        .split(|byte| *byte == b'\n')
        .next()
        .unwrap_or_default();
    // A file edited on Windows ends its lines with "\r\n".
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        bail!(
            "the first line of password file {} is empty",
            file.display()
        );
    }
    let text = std::str::from_utf8(line)
        .map_err(|_| anyhow!("password file {} is not valid UTF-8", file.display()))?;
    Ok(Zeroizing::new(text.to_owned()))
}

fn prompt(purpose: Purpose) -> Result<Password> {
    let read = |prompt: &str| -> Result<Password> {
        rpassword::prompt_password(prompt)
            .map(Zeroizing::new)
            .context("cannot read the root password from the terminal")
    };
    match purpose {
        Purpose::Unlock(root) => {
            let password = read(&format!("Root password for /{root}: "))?;
            if password.is_empty() {
                bail!("no root password was typed");
            }
            Ok(password)
        }
        Purpose::Create => {
            let password = read("New root password: ")?;
            check_new(&password)?;
            let again = read("Type the new root password again: ")?;
            if password != again {
                bail!("the two root passwords typed differ");
            }
            Ok(password)
        }
    }
}

fn check_new(password: &str) -> Result<()> {
    let chars = password.chars().count();
    if chars < MIN_NEW_PASSWORD_CHARS {
        bail!(
            "a new root password needs at least {MIN_NEW_PASSWORD_CHARS} characters; this one has {chars}"
        );
    }
    Ok(())
}
