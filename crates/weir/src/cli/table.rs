//! Aligned plain-text tables for the human-readable output.

/// Longest cell shown before it is cut with `…`, so that one large JSON value does not push
/// every other column off the screen.
pub const CELL_CHARS_MAX: usize = 80;

/// Gap between two columns.
const COLUMN_GAP: &str = "  ";

/// Rows under a header, printed with every column aligned.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|title| title.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; cells beyond the header's width are dropped, missing ones are blank.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells: Vec<String> = cells.into_iter().map(|cell| shorten(&cell)).collect();
        cells.resize(self.header.len(), String::new());
        self.rows.push(cells);
    }

    /// The table as text, one line per row, ending with a newline. The last column is not
    /// padded, so lines carry no trailing spaces.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|title| width(title)).collect();
        for row in &self.rows {
            for (index, cell) in row.iter().enumerate() {
                widths[index] = widths[index].max(width(cell));
            }
        }
        let mut text = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let last = row.len().saturating_sub(1);
            let mut line = String::new();
            for (index, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if index < last {
                    let padding = widths[index] - width(cell);
                    line.extend(std::iter::repeat_n(' ', padding));
                    line.push_str(COLUMN_GAP);
                }
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }
}

/// Key-value lines, keys aligned: the layout of one object.
pub fn pairs(pairs: &[(&str, String)]) -> String {
    let key_width = pairs.iter().map(|(key, _)| width(key)).max().unwrap_or(0);
    let mut text = String::new();
    for (key, value) in pairs {
        let padding = key_width - width(key);
        text.push_str(key);
        text.extend(std::iter::repeat_n(' ', padding));
        text.push_str(COLUMN_GAP);
        text.push_str(value);
        text.push('\n');
    }
    text
}

/// A JSON value on one line; strings without quotes.
pub fn compact(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// One line (newlines and tabs become spaces) of at most [`CELL_CHARS_MAX`] characters.
pub fn shorten(text: &str) -> String {
    let flat: String = text
        .chars()
        .map(|character| match character {
            '\n' | '\r' | '\t' => ' ',
            other => other,
        })
        .collect();
    if width(&flat) <= CELL_CHARS_MAX {
        return flat;
    }
    let mut cut: String = flat.chars().take(CELL_CHARS_MAX - 1).collect();
    cut.push('…');
    cut
}

fn width(text: &str) -> usize {
    text.chars().count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_without_trailing_spaces() {
        // Goal: columns line up whatever the widths; method: render a small table.
        let mut table = Table::new(&["ID", "STATUS", "NOTE"]);
        table.row(vec!["order-1".into(), "completed".into(), String::new()]);
        table.row(vec!["o2".into(), "failed".into(), "card ✗".into()]);
        assert_eq!(
            table.render(),
            "ID       STATUS     NOTE\n\
             order-1  completed\n\
             o2       failed     card ✗\n"
        );
    }

    #[test]
    fn long_and_multi_line_cells_are_cut() {
        // Goal: one cell cannot break the layout.
        let long = "x".repeat(CELL_CHARS_MAX + 10);
        let cut = shorten(&long);
        assert_eq!(cut.chars().count(), CELL_CHARS_MAX);
        assert!(cut.ends_with('…'));
        assert_eq!(shorten("a\nb"), "a b");
    }

    #[test]
    fn key_value_pairs() {
        assert_eq!(
            pairs(&[("id", "i1".into()), ("status", "running".into())]),
            "id      i1\nstatus  running\n"
        );
    }
}
