//! The frame codec (to be written).
