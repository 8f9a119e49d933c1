//! Output for people and for `grep`: `label: value` lines with aligned values.

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::io::Write;

/// Public key bytes as unpadded base64url, the alphabet principal ids use.
pub fn key_text(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A block of `label: value` lines, printed together so the values line up.
#[derive(Debug, Default)]
pub struct Report {
    lines: Vec<Line>,
}

#[derive(Debug)]
enum Line {
    Field(String, String),
    Text(String),
}

impl Report {
    /// An empty report.
    pub fn new() -> Report {
        Report::default()
    }

    /// Adds `label: value`.
    pub fn field(&mut self, label: &str, value: impl ToString) -> &mut Report {
        self.lines
            .push(Line::Field(label.to_owned(), value.to_string()));
        self
    }

    /// Adds a line printed as is.
    pub fn text(&mut self, text: impl ToString) -> &mut Report {
        self.lines.push(Line::Text(text.to_string()));
        self
    }

    /// Writes the report to standard output.
    pub fn print(&self) -> Result<()> {
        let width = self
            .lines
            .iter()
            .filter_map(|line| match line {
                Line::Field(label, _) => Some(label.len() + 1),
                Line::Text(_) => None,
            })
            .max()
            .unwrap_or(0);
        let mut stdout = std::io::stdout().lock();
        for line in &self.lines {
            match line {
                Line::Field(label, value) => {
                    let label = format!("{label}:");
                    writeln!(stdout, "{label:<width$} {value}")
                }
                Line::Text(text) => writeln!(stdout, "{text}"),
            }
            .context("cannot write to standard output")?;
        }
        stdout.flush().context("cannot write to standard output")
    }
}
