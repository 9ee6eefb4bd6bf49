//! The kernel NBD driver's generic-netlink interface (family "nbd",
//! include/uapi/linux/nbd-netlink.h), hand-rolled over libc: the encoding and
//! decoding of messages is pure (byte vectors in and out, unit-tested below);
//! [`GenlSocket`] is the thin part that sends and receives them.
//!
//! What pairbd uses: `NBD_CMD_CONNECT` (connected sockets, size, block size,
//! request timeout, dead-connection timeout), `NBD_CMD_RECONFIGURE` (new
//! sockets in place of dead ones), `NBD_CMD_DISCONNECT`, and the multicast
//! group "nbd_mc_group", on which the kernel announces `NBD_CMD_LINK_DEAD`
//! with the device index whenever one of a device's sockets dies.
//!
//! Why not a crate: the whole interface is four commands with a handful of
//! integer attributes; neli would bring a large API (and its own error and
//! buffer types) for about two hundred lines of encoding written here.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

// ----- constants of the kernel's uapi headers -------------------------------------------

const NETLINK_GENERIC: libc::c_int = 16;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(1 << 15 | 1 << 14);

const NLMSG_HEADER_LEN: usize = 16;
const GENL_HEADER_LEN: usize = 4;
const NLA_HEADER_LEN: usize = 4;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;

/// The NBD family's name and multicast group.
pub const NBD_FAMILY: &str = "nbd";
pub const NBD_MCAST_GROUP: &str = "nbd_mc_group";
const NBD_GENL_VERSION: u8 = 1;

pub const NBD_CMD_CONNECT: u8 = 1;
pub const NBD_CMD_DISCONNECT: u8 = 2;
pub const NBD_CMD_RECONFIGURE: u8 = 3;
pub const NBD_CMD_LINK_DEAD: u8 = 4;

const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// Most sockets one message carries (the kernel accepts more; pairbd's attach
/// allows 16 connections).
pub const SOCKETS_MAX: usize = 16;

/// Largest message accepted from the kernel (replies here are a few hundred bytes;
/// the family's description with its operations is a few KiB).
const RECEIVE_BUFFER_BYTES: usize = 32 * 1024;

/// A netlink failure.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the kernel answered {operation} with {error}")]
    Kernel {
        operation: &'static str,
        error: std::io::Error,
    },
    #[error("malformed netlink message: {0}")]
    Malformed(&'static str),
    #[error("the kernel has no generic-netlink family {0:?} (nbd module too old or not loaded)")]
    NoFamily(String),
    #[error("the nbd family has no multicast group {0:?}")]
    NoGroup(&'static str),
    #[error("too many sockets ({0}; at most {SOCKETS_MAX})")]
    TooManySockets(usize),
}

// ----- encoding (pure) ----------------------------------------------------------------------

/// Builds one generic-netlink message: header, then attributes, nests closed in order.
#[derive(Debug)]
pub struct MessageBuilder {
    bytes: Vec<u8>,
    nests: Vec<usize>,
}

impl MessageBuilder {
    /// A request for `family` (its numeric id) with command `cmd`.
    pub fn new(family: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> MessageBuilder {
        let mut bytes = Vec::with_capacity(128);
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish
        bytes.extend_from_slice(&family.to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        bytes.extend_from_slice(&[cmd, version, 0, 0]);
        MessageBuilder {
            bytes,
            nests: Vec::new(),
        }
    }

    fn put(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = NLA_HEADER_LEN + value.len();
        // Attribute lengths fit u16: every value here is a few bytes.
        self.bytes
            .extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(value);
        self.pad();
        self
    }

    fn pad(&mut self) {
        while self.bytes.len() % 4 != 0 {
            self.bytes.push(0);
        }
    }

    pub fn u32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.put(kind, &value.to_ne_bytes())
    }

    pub fn u64(&mut self, kind: u16, value: u64) -> &mut Self {
        self.put(kind, &value.to_ne_bytes())
    }

    /// A NUL-terminated string.
    pub fn string(&mut self, kind: u16, value: &str) -> &mut Self {
        let mut data = value.as_bytes().to_vec();
        data.push(0);
        self.put(kind, &data)
    }

    pub fn begin_nest(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.bytes.len());
        self.put(kind | NLA_F_NESTED, &[])
    }

    pub fn end_nest(&mut self) -> &mut Self {
        if let Some(start) = self.nests.pop() {
            let len = u16::try_from(self.bytes.len() - start).unwrap_or(u16::MAX);
            self.bytes[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    /// The finished message (open nests are closed).
    pub fn finish(mut self) -> Vec<u8> {
        while !self.nests.is_empty() {
            self.end_nest();
        }
        let len = u32::try_from(self.bytes.len()).unwrap_or(u32::MAX);
        self.bytes[..4].copy_from_slice(&len.to_ne_bytes());
        self.bytes
    }
}

/// The generic-netlink controller's "which id has family NAME" request.
pub fn encode_get_family(seq: u32, name: &str) -> Vec<u8> {
    let mut m = MessageBuilder::new(
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CTRL_CMD_GETFAMILY,
        1,
    );
    m.string(CTRL_ATTR_FAMILY_NAME, name);
    m.finish()
}

/// What `NBD_CMD_CONNECT` configures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The device: N of /dev/nbdN.
    pub index: u32,
    pub size_bytes: u64,
    pub block_size_bytes: u64,
    /// Seconds after which a request without a reply is retried on another (or a
    /// reconfigured) socket; 0 waits forever.
    pub timeout_seconds: u64,
    /// Seconds new requests wait for a live socket once all are dead, before they
    /// fail; 0 fails them at once.
    pub dead_conn_timeout_seconds: u64,
    /// The export's transmission flags from the handshake.
    pub server_flags: u64,
}

fn put_sockets(m: &mut MessageBuilder, fds: &[RawFd]) -> Result<(), NetlinkError> {
    if fds.len() > SOCKETS_MAX {
        return Err(NetlinkError::TooManySockets(fds.len()));
    }
    m.begin_nest(NBD_ATTR_SOCKETS);
    for fd in fds {
        m.begin_nest(NBD_SOCK_ITEM);
        // File descriptors are never negative here: they come from open sockets.
        m.u32(NBD_SOCK_FD, u32::try_from(*fd).unwrap_or(u32::MAX));
        m.end_nest();
    }
    m.end_nest();
    Ok(())
}

pub fn encode_connect(
    family: u16,
    seq: u32,
    request: &ConnectRequest,
    fds: &[RawFd],
) -> Result<Vec<u8>, NetlinkError> {
    let mut m = MessageBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_CONNECT,
        NBD_GENL_VERSION,
    );
    m.u32(NBD_ATTR_INDEX, request.index)
        .u64(NBD_ATTR_SIZE_BYTES, request.size_bytes)
        .u64(NBD_ATTR_BLOCK_SIZE_BYTES, request.block_size_bytes)
        .u64(NBD_ATTR_TIMEOUT, request.timeout_seconds)
        .u64(
            NBD_ATTR_DEAD_CONN_TIMEOUT,
            request.dead_conn_timeout_seconds,
        )
        .u64(NBD_ATTR_SERVER_FLAGS, request.server_flags);
    put_sockets(&mut m, fds)?;
    Ok(m.finish())
}

/// New sockets for device `index`: each replaces one dead socket (surplus ones are
/// dropped by the kernel).
pub fn encode_reconfigure(
    family: u16,
    seq: u32,
    index: u32,
    fds: &[RawFd],
) -> Result<Vec<u8>, NetlinkError> {
    let mut m = MessageBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_RECONFIGURE,
        NBD_GENL_VERSION,
    );
    m.u32(NBD_ATTR_INDEX, index);
    put_sockets(&mut m, fds)?;
    Ok(m.finish())
}

pub fn encode_disconnect(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut m = MessageBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_DISCONNECT,
        NBD_GENL_VERSION,
    );
    m.u32(NBD_ATTR_INDEX, index);
    m.finish()
}

// ----- decoding (pure) ----------------------------------------------------------------------

/// One received netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// NLMSG_ERROR: 0 is an acknowledgement, otherwise a negative errno.
    Ack { seq: u32, errno: i32 },
    /// A generic-netlink message: its family (type), command and attributes' bytes.
    Genl {
        family: u16,
        seq: u32,
        cmd: u8,
        attributes: Vec<u8>,
    },
    /// NLMSG_DONE or another control message.
    Other { kind: u16 },
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// Splits a datagram into messages.
pub fn parse_messages(mut bytes: &[u8]) -> Result<Vec<Received>, NetlinkError> {
    let mut out = Vec::new();
    while bytes.len() >= NLMSG_HEADER_LEN {
        let len = read_u32(bytes, 0).ok_or(NetlinkError::Malformed("header"))? as usize;
        if len < NLMSG_HEADER_LEN || len > bytes.len() {
            return Err(NetlinkError::Malformed("message length"));
        }
        let kind = read_u16(bytes, 4).unwrap_or(0);
        let seq = read_u32(bytes, 8).unwrap_or(0);
        let body = &bytes[NLMSG_HEADER_LEN..len];
        out.push(match kind {
            NLMSG_ERROR => {
                let errno = read_u32(body, 0).ok_or(NetlinkError::Malformed("error message"))?;
                Received::Ack {
                    seq,
                    errno: errno as i32,
                }
            }
            NLMSG_DONE | 0..=15 => Received::Other { kind },
            family => {
                if body.len() < GENL_HEADER_LEN {
                    return Err(NetlinkError::Malformed("generic-netlink header"));
                }
                Received::Genl {
                    family,
                    seq,
                    cmd: body[0],
                    attributes: body[GENL_HEADER_LEN..].to_vec(),
                }
            }
        });
        let aligned = (len + 3) & !3;
        bytes = bytes.get(aligned..).unwrap_or_default();
    }
    Ok(out)
}

/// The attributes in `bytes`: (type without flags, value).
pub fn parse_attributes(mut bytes: &[u8]) -> Result<Vec<(u16, &[u8])>, NetlinkError> {
    let mut out = Vec::new();
    while bytes.len() >= NLA_HEADER_LEN {
        let len = usize::from(read_u16(bytes, 0).unwrap_or(0));
        let kind = read_u16(bytes, 2).unwrap_or(0) & NLA_TYPE_MASK;
        if len < NLA_HEADER_LEN || len > bytes.len() {
            return Err(NetlinkError::Malformed("attribute length"));
        }
        out.push((kind, &bytes[NLA_HEADER_LEN..len]));
        let aligned = (len + 3) & !3;
        bytes = bytes.get(aligned..).unwrap_or_default();
    }
    Ok(out)
}

fn attribute_u32(attributes: &[(u16, &[u8])], kind: u16) -> Option<u32> {
    attributes
        .iter()
        .find(|(k, _)| *k == kind)
        .and_then(|(_, v)| read_u32(v, 0))
}

/// A resolved family: its id and its multicast groups by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub id: u16,
    pub groups: Vec<(String, u32)>,
}

/// Reads the controller's answer to [`encode_get_family`].
pub fn decode_family(attributes: &[u8]) -> Result<Family, NetlinkError> {
    let attributes = parse_attributes(attributes)?;
    let id = attributes
        .iter()
        .find(|(k, _)| *k == CTRL_ATTR_FAMILY_ID)
        .and_then(|(_, v)| read_u16(v, 0))
        .ok_or(NetlinkError::Malformed("no family id"))?;
    let mut groups = Vec::new();
    if let Some((_, nested)) = attributes
        .iter()
        .find(|(k, _)| *k == CTRL_ATTR_MCAST_GROUPS)
    {
        for (_, group) in parse_attributes(nested)? {
            let fields = parse_attributes(group)?;
            let name = fields
                .iter()
                .find(|(k, _)| *k == CTRL_ATTR_MCAST_GRP_NAME)
                .map(|(_, v)| {
                    String::from_utf8_lossy(v)
                        .trim_end_matches('\0')
                        .to_string()
                });
            let gid = attribute_u32(&fields, CTRL_ATTR_MCAST_GRP_ID);
            if let (Some(name), Some(gid)) = (name, gid) {
                groups.push((name, gid));
            }
        }
    }
    Ok(Family { id, groups })
}

/// The device index of an NBD multicast message (`NBD_CMD_LINK_DEAD`), if it is one.
pub fn link_dead_index(message: &Received, family: u16) -> Option<u32> {
    match message {
        Received::Genl {
            family: f,
            cmd: NBD_CMD_LINK_DEAD,
            attributes,
            ..
        } if *f == family => attribute_u32(&parse_attributes(attributes).ok()?, NBD_ATTR_INDEX),
        _ => None,
    }
}

// ----- the socket (thin) --------------------------------------------------------------------

/// A generic-netlink socket.
#[derive(Debug)]
pub struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
}

impl GenlSocket {
    pub fn open() -> Result<GenlSocket, NetlinkError> {
        // SAFETY: socket(2) takes no pointers; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_nl is valid; pid 0 lets the kernel pick the port.
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: address is a valid sockaddr_nl of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&address as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(GenlSocket { fd, seq: 1 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Bounds each receive: `None` waits forever.
    pub fn set_receive_timeout(&self, timeout: Option<Duration>) -> Result<(), NetlinkError> {
        let timeout = timeout.unwrap_or_default();
        let value = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
        };
        self.setsockopt(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &value)
    }

    fn setsockopt<T>(
        &self,
        level: libc::c_int,
        name: libc::c_int,
        value: &T,
    ) -> Result<(), NetlinkError> {
        // SAFETY: value points to a T of the size passed, alive for the call.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (value as *const T).cast(),
                std::mem::size_of::<T>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    pub fn join_group(&self, group: u32) -> Result<(), NetlinkError> {
        self.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group)
    }

    fn send(&self, message: &[u8]) -> Result<(), NetlinkError> {
        // SAFETY: message is a valid buffer of the length passed.
        let rc = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// One datagram's messages; an error of kind WouldBlock/TimedOut when the
    /// receive timeout passed.
    pub fn receive(&self) -> Result<Vec<Received>, NetlinkError> {
        let mut buffer = vec![0u8; RECEIVE_BUFFER_BYTES];
        // SAFETY: buffer is a valid writable buffer of the length passed.
        let rc = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        buffer.truncate(rc as usize);
        parse_messages(&buffer)
    }

    /// Sends a request (built with sequence number `seq`) and waits for its
    /// acknowledgement; returns the generic-netlink answers that came before it.
    fn transact(
        &self,
        operation: &'static str,
        seq: u32,
        message: &[u8],
    ) -> Result<Vec<Received>, NetlinkError> {
        self.send(message)?;
        let mut answers = Vec::new();
        // Bounded: a request is answered by at most a few messages before its ack.
        for _ in 0..64 {
            for received in self.receive()? {
                match received {
                    Received::Ack { seq: s, errno } if s == seq => {
                        if errno == 0 {
                            return Ok(answers);
                        }
                        return Err(NetlinkError::Kernel {
                            operation,
                            error: std::io::Error::from_raw_os_error(-errno),
                        });
                    }
                    Received::Genl { seq: s, .. } if s == seq => answers.push(received),
                    _ => {}
                }
            }
        }
        Err(NetlinkError::Malformed("no acknowledgement"))
    }

    /// The id and multicast groups of family `name`.
    pub fn resolve(&mut self, name: &str) -> Result<Family, NetlinkError> {
        let seq = self.next_seq();
        let answers = match self.transact("CTRL_CMD_GETFAMILY", seq, &encode_get_family(seq, name))
        {
            Ok(answers) => answers,
            Err(NetlinkError::Kernel { error, .. })
                if error.raw_os_error() == Some(libc::ENOENT) =>
            {
                return Err(NetlinkError::NoFamily(name.to_string()))
            }
            Err(e) => return Err(e),
        };
        for answer in answers {
            if let Received::Genl { attributes, .. } = answer {
                return decode_family(&attributes);
            }
        }
        Err(NetlinkError::NoFamily(name.to_string()))
    }

    pub fn connect(
        &mut self,
        family: u16,
        request: &ConnectRequest,
        fds: &[RawFd],
    ) -> Result<(), NetlinkError> {
        let seq = self.next_seq();
        let message = encode_connect(family, seq, request, fds)?;
        self.transact("NBD_CMD_CONNECT", seq, &message).map(drop)
    }

    pub fn reconfigure(
        &mut self,
        family: u16,
        index: u32,
        fds: &[RawFd],
    ) -> Result<(), NetlinkError> {
        let seq = self.next_seq();
        let message = encode_reconfigure(family, seq, index, fds)?;
        self.transact("NBD_CMD_RECONFIGURE", seq, &message)
            .map(drop)
    }

    pub fn disconnect(&mut self, family: u16, index: u32) -> Result<(), NetlinkError> {
        let seq = self.next_seq();
        self.transact(
            "NBD_CMD_DISCONNECT",
            seq,
            &encode_disconnect(family, seq, index),
        )
        .map(drop)
    }
}

/// The NBD family, resolved on a fresh socket.
pub fn nbd_family() -> Result<(GenlSocket, Family), NetlinkError> {
    let mut socket = GenlSocket::open()?;
    let family = socket.resolve(NBD_FAMILY)?;
    Ok((socket, family))
}

/// The id of the NBD multicast group in `family`.
pub fn nbd_group(family: &Family) -> Result<u32, NetlinkError> {
    family
        .groups
        .iter()
        .find(|(name, _)| name == NBD_MCAST_GROUP)
        .map(|(_, id)| *id)
        .ok_or(NetlinkError::NoGroup(NBD_MCAST_GROUP))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(bytes: &[u8], at: usize) -> u16 {
        read_u16(bytes, at).unwrap()
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        read_u32(bytes, at).unwrap()
    }

    #[test]
    fn the_header_holds_length_family_flags_seq_and_command() {
        let bytes = encode_disconnect(0x1a, 7, 3);
        // nlmsghdr 16 + genlmsghdr 4 + one u32 attribute 8.
        assert_eq!(bytes.len(), 28);
        assert_eq!(u32_at(&bytes, 0), 28);
        assert_eq!(u16_at(&bytes, 4), 0x1a);
        assert_eq!(u16_at(&bytes, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32_at(&bytes, 8), 7);
        assert_eq!(u32_at(&bytes, 12), 0);
        assert_eq!(&bytes[16..20], &[NBD_CMD_DISCONNECT, 1, 0, 0]);
        assert_eq!(u16_at(&bytes, 20), 8);
        assert_eq!(u16_at(&bytes, 22), NBD_ATTR_INDEX);
        assert_eq!(u32_at(&bytes, 24), 3);
    }

    #[test]
    fn connect_carries_every_setting_and_nested_sockets() {
        let request = ConnectRequest {
            index: 0,
            size_bytes: 320 << 20,
            block_size_bytes: 4096,
            timeout_seconds: 30,
            dead_conn_timeout_seconds: 120,
            server_flags: 0x1ed,
        };
        let bytes = encode_connect(0x20, 2, &request, &[5, 9]).unwrap();
        assert_eq!(u32_at(&bytes, 0) as usize, bytes.len());
        let attributes = parse_attributes(&bytes[20..]).unwrap();
        let kinds: Vec<u16> = attributes.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            [
                NBD_ATTR_INDEX,
                NBD_ATTR_SIZE_BYTES,
                NBD_ATTR_BLOCK_SIZE_BYTES,
                NBD_ATTR_TIMEOUT,
                NBD_ATTR_DEAD_CONN_TIMEOUT,
                NBD_ATTR_SERVER_FLAGS,
                NBD_ATTR_SOCKETS
            ]
        );
        // The kernel's policy: INDEX is u32, the rest u64.
        assert_eq!(attributes[0].1.len(), 4);
        let u64_of = |v: &[u8]| u64::from_ne_bytes(v.try_into().unwrap());
        assert_eq!(u64_of(attributes[1].1), 320 << 20);
        assert_eq!(u64_of(attributes[2].1), 4096);
        assert_eq!(u64_of(attributes[3].1), 30);
        assert_eq!(u64_of(attributes[4].1), 120);
        assert_eq!(u64_of(attributes[5].1), 0x1ed);
        // The nest is flagged NLA_F_NESTED on the wire.
        let sockets_at = 20
            + bytes[20..]
                .windows(2)
                .position(|w| u16::from_ne_bytes([w[0], w[1]]) == NBD_ATTR_SOCKETS | NLA_F_NESTED)
                .unwrap()
            - 2;
        assert_eq!(
            usize::from(u16_at(&bytes, sockets_at)),
            bytes.len() - sockets_at
        );
        let items = parse_attributes(attributes[6].1).unwrap();
        assert_eq!(items.len(), 2);
        let fds: Vec<u32> = items
            .iter()
            .map(|(kind, item)| {
                assert_eq!(*kind, NBD_SOCK_ITEM);
                let fields = parse_attributes(item).unwrap();
                assert_eq!(fields.len(), 1);
                assert_eq!(fields[0].0, NBD_SOCK_FD);
                u32_at(fields[0].1, 0)
            })
            .collect();
        assert_eq!(fds, [5, 9]);
    }

    #[test]
    fn reconfigure_names_the_device_and_the_new_sockets_only() {
        let bytes = encode_reconfigure(0x20, 3, 4, &[11]).unwrap();
        assert_eq!(bytes[16], NBD_CMD_RECONFIGURE);
        let attributes = parse_attributes(&bytes[20..]).unwrap();
        assert_eq!(attributes.len(), 2);
        assert_eq!(attributes[0], (NBD_ATTR_INDEX, &4u32.to_ne_bytes()[..]));
        assert_eq!(attributes[1].0, NBD_ATTR_SOCKETS);
        assert!(encode_reconfigure(0x20, 3, 4, &[3; SOCKETS_MAX + 1]).is_err());
    }

    #[test]
    fn strings_are_nul_terminated_and_padded() {
        let bytes = encode_get_family(1, "nbd");
        assert_eq!(u16_at(&bytes, 4), GENL_ID_CTRL);
        assert_eq!(bytes[16], CTRL_CMD_GETFAMILY);
        assert_eq!(u16_at(&bytes, 20), 8); // 4 + "nbd\0"
        assert_eq!(&bytes[24..28], b"nbd\0");
        let bytes = encode_get_family(1, "nbd_x");
        assert_eq!(u16_at(&bytes, 20), 10);
        assert_eq!(bytes.len(), 20 + 12);
    }

    /// A controller answer as the kernel builds it, from the builder (whose layout
    /// the tests above pin).
    fn family_answer(seq: u32) -> Vec<u8> {
        let mut m = MessageBuilder::new(GENL_ID_CTRL, 0, seq, 1, 2);
        m.u32(CTRL_ATTR_FAMILY_ID, 0x1b)
            .string(CTRL_ATTR_FAMILY_NAME, "nbd");
        m.begin_nest(CTRL_ATTR_MCAST_GROUPS);
        m.begin_nest(1);
        m.string(CTRL_ATTR_MCAST_GRP_NAME, "nbd_mc_group")
            .u32(CTRL_ATTR_MCAST_GRP_ID, 9);
        m.end_nest();
        m.end_nest();
        m.finish()
    }

    #[test]
    fn a_family_answer_and_its_ack_decode() {
        let mut datagram = family_answer(5);
        // NLMSG_ERROR with errno 0 (an ack) and the request's header after it.
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&0u16.to_ne_bytes());
        ack.extend_from_slice(&5u32.to_ne_bytes());
        ack.extend_from_slice(&0u32.to_ne_bytes());
        ack.extend_from_slice(&0i32.to_ne_bytes());
        ack.extend_from_slice(&[0; 16]);
        datagram.extend_from_slice(&ack);
        let messages = parse_messages(&datagram).unwrap();
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[1], Received::Ack { seq: 5, errno: 0 });
        let Received::Genl { attributes, .. } = &messages[0] else {
            panic!("{messages:?}")
        };
        let family = decode_family(attributes).unwrap();
        assert_eq!(family.id, 0x1b);
        assert_eq!(nbd_group(&family).unwrap(), 9);
    }

    #[test]
    fn link_dead_names_its_device() {
        let mut m = MessageBuilder::new(0x1b, 0, 0, NBD_CMD_LINK_DEAD, 1);
        m.u32(NBD_ATTR_INDEX, 2);
        let messages = parse_messages(&m.finish()).unwrap();
        assert_eq!(link_dead_index(&messages[0], 0x1b), Some(2));
        assert_eq!(link_dead_index(&messages[0], 0x1c), None);
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        for bytes in [
            vec![255u8; 16],
            vec![0u8; 16],
            vec![20, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2],
        ] {
            let _ = parse_messages(&bytes);
        }
        assert!(parse_attributes(&[200, 0, 1, 0]).is_err());
        assert!(parse_attributes(&[2, 0, 1, 0]).is_err());
        assert!(decode_family(&[]).is_err());
        // A short generic-netlink message.
        let mut short = 18u32.to_ne_bytes().to_vec();
        short.extend_from_slice(&[0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2]);
        assert!(parse_messages(&short).is_err());
    }
}
