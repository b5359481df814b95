import { isIPv4 } from 'node:net'

/**
 * Whether a socket's remote address is this machine's loopback interface: `127.0.0.0/8`, `::1`,
 * or either written as an IPv4-mapped IPv6 address (`::ffff:127.0.0.1`, as a dual-stack listener
 * reports it). Only for the socket's own address: a forwarded header says whatever its sender wants.
 */
export function isLoopbackAddress (address: string | undefined): boolean {
  if (address === undefined) return false
  const lower = address.toLowerCase()
  if (lower === '::1' || lower === '0:0:0:0:0:0:0:1') return true
  const v4 = lower.startsWith('::ffff:') ? lower.slice('::ffff:'.length) : lower
  return isIPv4(v4) && v4.startsWith('127.')
}
