//! Opening a PATH that is either an arena file or a bare image.

use std::fs::{File, Metadata};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kho_alloc::check::{self, CheckError, InputKind, Slots};
use kho_alloc::superblock::ImageLocation;
use kho_alloc::ReadOnlyFile;
use kho_core::Image;

/// A file mapped read-only.
#[derive(Debug)]
pub struct Input {
    /// The path as given.
    pub path: PathBuf,
    map: ReadOnlyFile,
    /// Device and inode, to recognise the same file under another name.
    id: (u64, u64),
}

/// The image of an input, with its arena context when it has one.
#[derive(Debug)]
pub struct Loaded<'a> {
    /// Superblock slots and the image location (arenas only).
    pub arena: Option<(Slots, ImageLocation)>,
    /// The parsed image.
    pub image: Image<'a>,
}

impl Input {
    /// Map `path` read-only.
    pub fn open(path: &Path) -> anyhow::Result<Input> {
        let file = File::open(path).with_context(|| format!("{}: open", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("{}: stat", path.display()))?;
        if meta.is_dir() {
            anyhow::bail!(
                "{}: is a directory, expected an arena or image file",
                path.display()
            );
        }
        let map = ReadOnlyFile::map(&file).with_context(|| format!("{}: map", path.display()))?;
        Ok(Input {
            path: path.to_owned(),
            map,
            id: (meta.dev(), meta.ino()),
        })
    }

    /// Whether `meta` describes this input's file (through any name, a
    /// hard link, `/dev/stdin` or `/proc/self/fd/N` included).
    pub fn is_same_file(&self, meta: &Metadata) -> bool {
        self.id == (meta.dev(), meta.ino())
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.bytes()
    }

    /// Arena or bare image, by the first bytes.
    pub fn kind(&self) -> InputKind {
        if check::is_image(self.bytes()) {
            InputKind::Image
        } else {
            InputKind::Arena
        }
    }

    /// Parse the image (found through the superblocks for an arena).
    pub fn load(&self) -> anyhow::Result<Loaded<'_>> {
        self.load_raw()
            .with_context(|| self.path.display().to_string())
    }

    fn load_raw(&self) -> Result<Loaded<'_>, CheckError> {
        match self.kind() {
            InputKind::Image => {
                let image = Image::parse(self.bytes())
                    .map_err(|source| CheckError::Image { base: 0, source })?;
                Ok(Loaded { arena: None, image })
            }
            InputKind::Arena => {
                let found = check::arena_image(self.bytes())?;
                Ok(Loaded {
                    arena: Some((found.slots, found.location)),
                    image: found.image,
                })
            }
        }
    }
}
