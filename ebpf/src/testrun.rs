//! Running a loaded program on a synthetic packet (BPF_PROG_TEST_RUN): the per-packet cost
//! measurement of `bench/`, and a way to check the verdict of a crafted packet without a
//! network. The kernel runs the program with the loopback device as the packet's interface
//! (ifindex 1), so an endpoint record for ifindex 1 decides how it is treated.

use std::os::fd::{AsFd, AsRawFd};

use ebpf_common::prog_names;

use crate::{BpfDatapath, Error};

/// Which program to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    FromEndpoint,
    ToEndpoint,
    HostIngress,
    HostEgress,
}

impl Program {
    fn name(self) -> &'static str {
        match self {
            Program::FromEndpoint => prog_names::FROM_ENDPOINT,
            Program::ToEndpoint => prog_names::TO_ENDPOINT,
            Program::HostIngress => prog_names::HOST_INGRESS,
            Program::HostEgress => prog_names::HOST_EGRESS,
        }
    }
}

/// The outcome of a test run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunResult {
    /// The program's return value (0 pass, 2 drop).
    pub retval: u32,
    /// Average nanoseconds per run, as the kernel measured it.
    pub duration_ns: u32,
}

/// `union bpf_attr` for BPF_PROG_TEST_RUN (uapi/linux/bpf.h, the `test` member).
#[repr(C)]
#[derive(Default)]
struct TestAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

impl BpfDatapath {
    /// Runs `program` `repeat` times on `packet` (an Ethernet frame).
    pub fn test_run(
        &self,
        program: Program,
        packet: &[u8],
        repeat: u32,
    ) -> Result<RunResult, Error> {
        self.with_program(program.name(), |p| {
            let fd = p.fd().map_err(|source| Error::Program {
                program: program.name(),
                source,
            })?;
            let mut out = vec![0u8; packet.len() + 256];
            let mut attr = TestAttr {
                prog_fd: fd.as_fd().as_raw_fd() as u32,
                data_size_in: packet.len() as u32,
                data_size_out: out.len() as u32,
                data_in: packet.as_ptr() as u64,
                data_out: out.as_mut_ptr() as u64,
                repeat,
                ..TestAttr::default()
            };
            // SAFETY: the bpf syscall reads/writes `attr` of the size given and the two
            // buffers whose sizes it names.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_PROG_TEST_RUN,
                    &mut attr as *mut TestAttr,
                    std::mem::size_of::<TestAttr>() as u32,
                )
            };
            if r != 0 {
                return Err(Error::io(
                    "BPF_PROG_TEST_RUN",
                    std::io::Error::last_os_error(),
                ));
            }
            Ok(RunResult {
                retval: attr.retval,
                duration_ns: attr.duration,
            })
        })?
    }
}

/// Builds Ethernet frames for test runs.
pub mod packet {
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn eth(proto: u16) -> Vec<u8> {
        let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        p.extend_from_slice(&proto.to_be_bytes());
        p
    }

    fn csum(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], 0])
            };
            s += u32::from(w);
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    fn ipv4(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, l4: &[u8]) -> Vec<u8> {
        let mut p = eth(0x0800);
        let total = (20 + l4.len()) as u16;
        let mut h = vec![0x45, 0];
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&dst.octets());
        let c = csum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(&h);
        p.extend_from_slice(l4);
        p
    }

    fn ipv6(proto: u8, src: Ipv6Addr, dst: Ipv6Addr, l4: &[u8]) -> Vec<u8> {
        let mut p = eth(0x86DD);
        p.extend_from_slice(&[0x60, 0, 0, 0]);
        p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        p.extend_from_slice(&[proto, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(l4);
        p
    }

    fn tcp_hdr(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = Vec::with_capacity(20);
        t.extend_from_slice(&sport.to_be_bytes());
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        t
    }

    fn udp_hdr(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
        let mut u = Vec::with_capacity(8 + payload);
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.resize(8 + payload, 0);
        u
    }

    /// A TCP segment (flags: 0x02 SYN, 0x10 ACK, ...).
    pub fn tcp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
        ipv4(6, src, dst, &tcp_hdr(sport, dport, flags))
    }

    pub fn udp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
        ipv4(17, src, dst, &udp_hdr(sport, dport, 16))
    }

    pub fn tcp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8) -> Vec<u8> {
        ipv6(6, src, dst, &tcp_hdr(sport, dport, flags))
    }

    /// An ARP request (not IP: passes untouched).
    pub fn arp() -> Vec<u8> {
        let mut p = eth(0x0806);
        p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        p.resize(42, 0);
        p
    }
}
