/** CPU time of the bench's processes (from /proc), as a share of one core between two samples. */
import { execFileSync } from 'node:child_process'
import { readFile } from 'node:fs/promises'

const CLOCK_TICKS = (() => {
  try { return Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100 } catch { return 100 }
})()

/** CPU time (user + system) of a process so far, ms; undefined where /proc cannot tell. */
async function cpuMs (pid: number | undefined): Promise<number | undefined> {
  if (pid === undefined) return undefined
  if (pid === process.pid) {
    const u = process.cpuUsage()
    return (u.user + u.system) / 1000
  }
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8')
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS * 1000
  } catch {
    return undefined
  }
}

/** CPU time of a process and its children (nginx's master and its workers), ms. */
async function treeCpuMs (pid: number | undefined): Promise<number | undefined> {
  const own = await cpuMs(pid)
  if (own === undefined || pid === process.pid) return own
  let children: number[] = []
  try {
    children = (await readFile(`/proc/${pid}/task/${pid}/children`, 'utf8')).trim().split(/\s+/).filter(Boolean).map(Number)
  } catch {}
  let total = own
  for (const child of children) total += await cpuMs(child) ?? 0
  return total
}

/** CPU time the whole machine spent busy so far, ms (all cores); undefined off Linux. */
async function machineBusyMs (): Promise<number | undefined> {
  try {
    const line = (await readFile('/proc/stat', 'utf8')).split('\n')[0]
    const [user, nice, system, , , irq, softirq, steal] = line.trim().split(/\s+/).slice(1).map(Number)
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS * 1000
  } catch {
    return undefined
  }
}

export type Role = 'clients' | 'simulators' | 'gateway' | 'redis' | 'nginx' | 'memory' | 'bare'
/** CPU use in percent of one core: the benchmark's processes, and everything else on the machine. */
export type CpuShare = Partial<Record<Role | 'others', number>>
/** The processes measured, by role (set as they start, deleted as they stop). */
export const pids: Partial<Record<Role, number>> = { clients: process.pid }

/** Share of one core each process used between two samples, percent. */
export class CpuMeter {
  private readonly start = new Map<Role, number | undefined>()
  private machineStart: number | undefined
  private startedAt = 0
  async begin (): Promise<void> {
    this.startedAt = performance.now()
    this.machineStart = await machineBusyMs()
    for (const role of Object.keys(pids) as Role[]) this.start.set(role, await treeCpuMs(pids[role]))
  }

  async end (): Promise<CpuShare> {
    const wall = performance.now() - this.startedAt
    const out: CpuShare = {}
    let ours = 0
    for (const role of Object.keys(pids) as Role[]) {
      const a = this.start.get(role)
      const b = await treeCpuMs(pids[role])
      if (a !== undefined && b !== undefined) {
        out[role] = Math.round((b - a) / wall * 100)
        ours += b - a
      }
    }
    const machineEnd = await machineBusyMs()
    if (this.machineStart !== undefined && machineEnd !== undefined) {
      out.others = Math.max(0, Math.round((machineEnd - this.machineStart - ours) / wall * 100))
    }
    return out
  }
}

export const ROLES = ['clients', 'simulators', 'gateway', 'memory', 'bare', 'redis', 'nginx', 'others'] as const
export const cpuText = (cpu: CpuShare): string =>
  ROLES.filter((r) => cpu[r] !== undefined).map((r) => `${r} ${cpu[r]}%`).join(', ')
