//! Positions of YAML nodes by path (`listeners[0].port`), so validation that runs after serde
//! can still point at the offending line and column. Paths use serde_yaml's spelling.

use std::collections::HashMap;

use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::Marker,
};

/// 1-based line and column of a node's first character.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl Position {
    /// The document's start, when nothing better is known.
    pub const START: Self = Self { line: 1, column: 1 };
}

#[derive(Debug, Default)]
pub struct Positions {
    nodes: HashMap<String, Position>,
    /// Where mapping entries' keys are, the last of a key given twice.
    keys: HashMap<String, Position>,
    /// The whole document parsed; else `nodes` holds those before the syntax error.
    pub complete: bool,
}

impl Positions {
    /// Indexes every node of `text`, or those before a syntax error.
    pub fn index(text: &str) -> Self {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        let complete = parser.load(&mut builder, false).is_ok();
        Self {
            nodes: builder.positions,
            keys: builder.keys,
            complete,
        }
    }

    /// Where the key of the mapping entry at `path` is (its last occurrence).
    pub fn key(&self, path: &str) -> Option<Position> {
        self.keys.get(path).copied()
    }

    /// The position of `path`, or of its nearest indexed ancestor, or 1:1.
    pub fn of(&self, path: &str) -> Position {
        self.find(path).unwrap_or(Position::START)
    }

    /// The position of `path` or of its nearest indexed ancestor; `None` when neither is
    /// indexed (an empty index: the document did not parse).
    pub fn find(&self, path: &str) -> Option<Position> {
        let mut p = path;
        loop {
            if let Some(pos) = self.nodes.get(p) {
                return Some(*pos);
            }
            p = &p[..p.rfind(['.', '['])?];
        }
    }
}

enum Frame {
    /// A mapping: the path of the mapping, and the key whose value comes next (None: a key)
    /// with the key's position.
    Map {
        path: String,
        key: Option<(String, Position)>,
    },
    Seq {
        path: String,
        next: usize,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    positions: HashMap<String, Position>,
    /// Where the key of each mapping entry is (by the entry's path).
    keys: HashMap<String, Position>,
}

impl Builder {
    /// The path of the node that starts now, or None when the event is a mapping key.
    fn next_path(&mut self) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some(p)
            }
            Some(Frame::Map { path, key }) => key.take().map(|(k, at)| {
                let p = if path.is_empty() {
                    k
                } else {
                    format!("{path}.{k}")
                };
                // The last: a key given twice is found at its second occurrence.
                self.keys.insert(p.clone(), at);
                p
            }),
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        // yaml-rust2 markers: 1-based line, 0-based column.
        let pos = Position {
            line: mark.line(),
            column: mark.col() + 1,
        };
        match ev {
            Event::Scalar(value, ..) => match self.next_path() {
                Some(path) => {
                    self.positions.insert(path, pos);
                }
                None => {
                    if let Some(Frame::Map { key, .. }) = self.stack.last_mut() {
                        *key = Some((value, pos));
                    }
                }
            },
            Event::Alias(_) => {
                if let Some(path) = self.next_path() {
                    self.positions.insert(path, pos);
                }
            }
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                // A complex key (rare) gets no path of its own; its contents are skipped.
                // A complex key (rare) gets no path of its own; its contents are skipped.
                let path = self.next_path().unwrap_or_else(|| "?".into());
                self.positions.entry(path.clone()).or_insert(pos);
                self.stack.push(match ev {
                    Event::SequenceStart(..) => Frame::Seq { path, next: 0 },
                    _ => Frame::Map { path, key: None },
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}
