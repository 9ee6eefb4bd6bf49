//! The error codes a server may put in a transmission-phase reply.

/// One of the error values the NBD protocol allows in a reply's error field.
///
/// The spec restricts the field to these values (named after the usual errno with the same
/// number) so that the meaning does not depend on the server's operating system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum NbdError {
    /// `NBD_EPERM`: operation not permitted, e.g. a write to a read-only export.
    #[error("EPERM: operation not permitted")]
    Perm,
    /// `NBD_EIO`: input/output error.
    #[error("EIO: input/output error")]
    Io,
    /// `NBD_ENOMEM`: cannot allocate memory (the spec asks servers to avoid it).
    #[error("ENOMEM: cannot allocate memory")]
    NoMem,
    /// `NBD_EINVAL`: invalid argument, e.g. a read past the end or an unknown flag.
    #[error("EINVAL: invalid argument")]
    Inval,
    /// `NBD_ENOSPC`: no space left on device, e.g. a write past the end.
    #[error("ENOSPC: no space left on device")]
    NoSpc,
    /// `NBD_EOVERFLOW`: value too large (only for unfragmentable structured reads).
    #[error("EOVERFLOW: value too large")]
    Overflow,
    /// `NBD_ENOTSUP`: operation not supported (only for fast-zero requests).
    #[error("ENOTSUP: operation not supported")]
    NotSup,
    /// `NBD_ESHUTDOWN`: the server is shutting down; the client must disconnect.
    #[error("ESHUTDOWN: server is shutting down")]
    Shutdown,
}

impl NbdError {
    /// Every variant, for tests and exhaustive tables.
    pub const ALL: [NbdError; 8] = [
        NbdError::Perm,
        NbdError::Io,
        NbdError::NoMem,
        NbdError::Inval,
        NbdError::NoSpc,
        NbdError::Overflow,
        NbdError::NotSup,
        NbdError::Shutdown,
    ];

    /// The value sent in the reply's error field.
    pub fn errno(self) -> u32 {
        match self {
            NbdError::Perm => 1,
            NbdError::Io => 5,
            NbdError::NoMem => 12,
            NbdError::Inval => 22,
            NbdError::NoSpc => 28,
            NbdError::Overflow => 75,
            NbdError::NotSup => 95,
            NbdError::Shutdown => 108,
        }
    }

    /// The error a reply's error field names, or `None` for 0 and for values the spec does
    /// not define (which the spec tells clients to treat as `EINVAL`).
    pub fn from_errno(value: u32) -> Option<NbdError> {
        NbdError::ALL
            .into_iter()
            .find(|error| error.errno() == value)
    }
}

#[cfg(test)]
mod tests {
    use super::NbdError;

    #[test]
    fn errno_values_match_the_spec() {
        let values: Vec<u32> = NbdError::ALL.iter().map(|e| e.errno()).collect();
        assert_eq!(values, vec![1, 5, 12, 22, 28, 75, 95, 108]);
    }

    #[test]
    fn from_errno_inverts_errno() {
        for error in NbdError::ALL {
            assert_eq!(NbdError::from_errno(error.errno()), Some(error));
        }
        assert_eq!(NbdError::from_errno(0), None);
        assert_eq!(NbdError::from_errno(2), None);
    }
}
