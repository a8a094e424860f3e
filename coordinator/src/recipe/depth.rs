//! How deeply a recipe's YAML nests, measured on its text in one linear pass, before any parser
//! sees it. The YAML scanner (libyaml, under serde_yaml) does work proportional to the depth for
//! every token inside a flow collection, so a 400,000-deep `[[[[…` of 800 KB took minutes to
//! refuse; a recipe deeper than [`MAX_RECIPE_DEPTH`] is refused here instead, in microseconds.
//!
//! The count is an upper bound in spirit, not a YAML parser: flow collections (`[`, `{`) count
//! one level each where they can open one (not inside quotes, comments or block scalars, nor in
//! the middle of a plain scalar such as `org/name[x]`); block structure counts one level per
//! indentation column still open and per `- ` / `? ` indicator that starts a nested node on the
//! same line (`- - - x`).

/// The deepest nesting a recipe may have. mergekit recipes need about 10 (a filter list inside
/// a parameter inside a source inside a slice is 8); 64 leaves room for anything hand-written.
pub const MAX_RECIPE_DEPTH: usize = 64;

/// Where the text first nests deeper than `max`: its line (from 1), if it does.
pub(super) fn too_deep(text: &str, max: usize) -> Option<usize> {
    let mut s = Scan::default();
    for (n, line) in text.lines().enumerate() {
        if s.line(line) > max {
            return Some(n + 1);
        }
    }
    None
}

#[derive(Default)]
struct Scan {
    /// The block nodes still open: their column, and whether each is a list (`- ` items).
    block: Vec<(usize, bool)>,
    /// Open flow collections (`[` / `{`), across lines.
    flow: usize,
    /// Inside a quoted scalar (its quote), across lines.
    quote: Option<u8>,
    /// Inside a block scalar (`|`, `>`): lines indented more than this column are its text.
    literal: Option<usize>,
}

impl Scan {
    /// Scans one line; returns the depth reached on it.
    fn line(&mut self, line: &str) -> usize {
        let b = line.as_bytes();
        let indent = b.iter().take_while(|&&c| c == b' ' || c == b'\t').count();
        let blank = indent == b.len() || b[indent] == b'#';
        if let Some(col) = self.literal {
            if blank || indent > col {
                return 0;
            }
            self.literal = None;
        }
        if blank && self.quote.is_none() {
            return 0;
        }
        let mut i = indent;
        if self.flow == 0 && self.quote.is_none() {
            i = self.block_line(b, indent);
        }
        let depth = self.inline(b, i, indent);
        depth.max(self.block.len() + self.flow)
    }

    /// A block line at column `indent`: closes the nodes it ends, opens the ones it starts.
    /// Returns where its content starts. A list of `- ` items may sit at its key's column (an
    /// indentless list): it counts as a level of its own, as it is one.
    fn block_line(&mut self, b: &[u8], indent: usize) -> usize {
        let item = |i: usize| b.get(i) == Some(&b'-') && matches!(b.get(i + 1), None | Some(b' '));
        let dash = item(indent);
        while self.block.last().is_some_and(|&(c, _)| c > indent) {
            self.block.pop();
        }
        if let Some(&(c, list)) = self.block.last() {
            if c == indent && (list || !dash) {
                // a sibling: the next item of the same list, or the next key of the same mapping
                self.block.pop();
                if list && !dash && self.block.last().is_some_and(|&(c, _)| c == indent) {
                    self.block.pop();
                }
            }
        }
        self.block.push((indent, dash));
        let mut i = indent;
        // `- - x`, `? - x`: each indicator opens a node one column further
        while i < b.len() && (item(i) || (b[i] == b'?' && b.get(i + 1) == Some(&b' '))) {
            i += 1;
            while i < b.len() && b[i] == b' ' {
                i += 1;
            }
            if i < b.len() && b[i] != b'#' {
                self.block.push((i, item(i)));
            }
        }
        i
    }

    /// Scans a line's content from `i`: quotes, comments, flow brackets, a block scalar's start.
    /// Returns the deepest point reached.
    fn inline(&mut self, b: &[u8], mut i: usize, indent: usize) -> usize {
        let mut deepest = self.block.len() + self.flow;
        while i < b.len() {
            let c = b[i];
            // where a token may start: line start, after blanks, or after a flow indicator
            let starts = i == 0 || b" \t[{,".contains(&b[i - 1]);
            match self.quote {
                Some(b'\'') if c == b'\'' && b.get(i + 1) == Some(&b'\'') => i += 1,
                Some(b'"') if c == b'\\' => i += 1,
                Some(q) if c == q => self.quote = None,
                Some(_) => {}
                None if c == b'#' && (i == 0 || b" \t".contains(&b[i - 1])) => break,
                None if (c == b'"' || c == b'\'') && starts => self.quote = Some(c),
                None if (c == b'[' || c == b'{') && (starts || self.flow > 0) => {
                    self.flow += 1;
                    deepest = deepest.max(self.block.len() + self.flow);
                }
                None if (c == b']' || c == b'}') && self.flow > 0 => self.flow -= 1,
                None if (c == b'|' || c == b'>') && starts && self.flow == 0 => {
                    // a block scalar's header runs to the end of the line (or a comment)
                    let rest = &b[i + 1..];
                    let end = rest.iter().position(|&x| x == b'#').unwrap_or(rest.len());
                    if rest[..end].iter().all(|x| b"+-0123456789 \t".contains(x)) {
                        self.literal = Some(indent);
                        break;
                    }
                }
                None => {}
            }
            i += 1;
        }
        deepest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth(text: &str) -> usize {
        let mut s = Scan::default();
        text.lines().map(|l| s.line(l)).max().unwrap_or(0)
    }

    #[test]
    fn real_recipes_are_shallow() {
        let slices = "merge_method: ties\nslices:\n- sources:\n  - model: a\n    layer_range: [0, 2]\n    parameters:\n      weight:\n      - filter: mlp\n        value: [0.1, 0.5]\n      - value: 1\n";
        let d = depth(slices);
        assert!((6..=10).contains(&d), "{d}");
        for ex in [
            "instruct-transfer-eu.yml",
            "multilingual-ties.yml",
            "multilingual-stages.yml",
        ] {
            let path = format!("{}/../examples/{ex}", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(depth(&text) <= 10, "{ex}: {}", depth(&text));
        }
    }

    #[test]
    fn flow_block_and_compact_nesting_count() {
        assert_eq!(depth("x: [[[1]]]"), 4);
        assert_eq!(depth("x: {a: {b: [1]}}"), 4);
        assert_eq!(depth("- - - - x"), 5); // four lists, and the item they hold
        assert_eq!(depth("a:\n b:\n  c:\n   d: 1\n"), 4);
        // a flow list over several lines keeps its depth
        assert_eq!(depth("x: [\n[\n[1]\n]\n]"), 4);
    }

    #[test]
    fn brackets_that_open_nothing_do_not_count() {
        for flat in [
            "model: org/name[x]",
            "filter: 'a[[[[b'",
            "filter: \"a[[[\\\"[[b\"",
            "x: 'it''s [[['",
            "x: 1 # [[[[[",
            "chat: |\n  [[[[[[\n  {{{{{\ny: 1",
            "chat: >-\n  [[[[\n\n  [[[[\ny: 1",
            "x: \"multi\n  line [[[[ still quoted\"",
        ] {
            assert!(depth(flat) <= 2, "{flat:?}: {}", depth(flat));
        }
    }

    #[test]
    fn deep_text_is_found_fast_with_its_line() {
        let deep = format!("merge_method: linear\nx: {}", "[".repeat(400_000));
        let t = std::time::Instant::now();
        assert_eq!(too_deep(&deep, MAX_RECIPE_DEPTH), Some(2));
        assert!(t.elapsed() < std::time::Duration::from_millis(100));
        let compact = format!("x:\n{}y", "- ".repeat(100));
        assert_eq!(too_deep(&compact, MAX_RECIPE_DEPTH), Some(2));
        let ok = format!("x: {}1{}", "[".repeat(60), "]".repeat(60));
        assert_eq!(too_deep(&ok, MAX_RECIPE_DEPTH), None);
    }
}
