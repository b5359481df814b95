// The GPU timeline (services/usage/gpu-timeline.ts): busy shares per minute from reads of the
// lease store's status, exact where the reads say so; and GET /admin/gpu-timeline on two replicas.
import t from 'tap'
import { startFleet } from './helpers/gateway.js'
import { GpuTimeline, type LeasedGpus } from '../services/usage/gpu-timeline.js'

const MIN = 60_000
const T0 = Date.UTC(2026, 0, 1, 10, 0, 0)
const leased = (gpuId: string, since?: number): LeasedGpus['gpus'][number] => ({ gpuId, since })

/** Reads every second from `from` to `to` (ms), `busy(at)` saying which GPUs hold a lease since when. */
function readEverySecond (timeline: GpuTimeline, from: number, to: number, busy: (at: number) => LeasedGpus['gpus']): void {
  for (let at = from; at <= to; at += 1000) timeline.observe(at, ['a', 'b'], { gpus: busy(at) })
}

t.test('a lease held half a minute is half of that minute; unread minutes are null', async (t) => {
  const timeline = new GpuTimeline()
  // reads from 10:00:00 to 10:02:00; GPU a leased from 10:00:30 (the store says) to about 10:01:00
  readEverySecond(timeline, T0, T0 + 2 * MIN, (at) => at >= T0 + 30_000 && at < T0 + MIN ? [leased('a', T0 + 30_000)] : [])
  const read = timeline.read(T0 + 2 * MIN + 500)
  t.equal(read.buckets, 60)
  t.equal(read.from, T0 + 2 * MIN - 59 * MIN, 'the window ends with the minute under way')
  t.equal(read.observedSince, T0)
  const a = read.busy.get('a') ?? []
  const b = read.busy.get('b') ?? []
  t.equal(a.length, 60)
  // 10:00 is bucket 57: busy from :30 until halfway between the read at 10:00:59 (busy) and 10:01:00 (free)
  t.equal(a[57], 0.492, '29.5 s of 60')
  t.equal(a[58], 0, 'free the next minute')
  t.same(a.slice(0, 57), new Array(57).fill(null), 'before the first read: unknown, not idle')
  t.equal(b[57], 0)
  t.equal(read.to, T0 + 2 * MIN)
})

t.test('a lease seen at the first read counts from then; one under way counts to the last read', async (t) => {
  const timeline = new GpuTimeline()
  readEverySecond(timeline, T0 + 20_000, T0 + MIN + 15_000, () => [leased('b', T0 - 5 * MIN)])
  const b = timeline.read(T0 + MIN + 15_000).busy.get('b') ?? []
  t.equal(b[58], 1, 'busy all of the observed part of 10:00 (from 10:00:20)')
  t.equal(b[59], 1, 'and of the minute under way')
})

t.test('reads that stop leave the minutes unknown, and a lease ends where it was last seen', async (t) => {
  const timeline = new GpuTimeline({ gapMs: 10_000 })
  readEverySecond(timeline, T0, T0 + 30_000, () => [leased('a', T0)])
  // the store could not be read for two minutes; then it answers again, GPU a free
  readEverySecond(timeline, T0 + 3 * MIN, T0 + 3 * MIN + 30_000, () => [])
  const read = timeline.read(T0 + 3 * MIN + 30_000)
  const a = read.busy.get('a') ?? []
  t.equal(a[56], 1, '10:00: busy for the 30 s that were read')
  t.equal(a[57], null, '10:01: never read')
  t.equal(a[58], null, '10:02: never read')
  t.equal(a[59], 0, '10:03: free')
})

t.test('a GPU gone from the inventory is forgotten; old intervals leave the window', async (t) => {
  const timeline = new GpuTimeline()
  readEverySecond(timeline, T0, T0 + 10_000, () => [leased('a', T0)])
  timeline.observe(T0 + 11_000, ['b'], { gpus: [] })
  t.notOk(timeline.read(T0 + 11_000).busy.has('a'))
  const later = new GpuTimeline()
  readEverySecond(later, T0, T0 + 10_000, () => [leased('a', T0)])
  readEverySecond(later, T0 + 10_000, T0 + 10_000, () => [])
  for (let at = T0 + 11_000; at <= T0 + 70 * MIN; at += 5000) later.observe(at, ['a', 'b'], { gpus: [] })
  const read = later.read(T0 + 69 * MIN + 56_000)
  t.ok((read.busy.get('a') ?? []).every((v) => v === 0), 'the lease of 10:00 is out of the last hour')
  t.equal(read.observedSince, T0, 'one unbroken run of reads')
})

t.test('a read older than the last one is ignored', async (t) => {
  const timeline = new GpuTimeline()
  timeline.observe(T0 + 2000, ['a'], { gpus: [] })
  timeline.observe(T0 + 1000, ['a'], { gpus: [leased('a', T0)] })
  timeline.observe(T0 + 3000, ['a'], { gpus: [] })
  t.equal(timeline.read(T0 + 3000).busy.get('a')?.[59], 0)
})

t.test('GET /admin/gpu-timeline: a replica nobody watches sees a lease taken on another one', async (t) => {
  const token = 'timeline-token'
  const fleet = await startFleet(t, { gpus: [1, 1], upstreams: [{ model: 'qwq', gpus: [0] }], options: { ADMIN_TOKEN: token } })
  const [one, two] = [await fleet.replica(), await fleet.replica()]
  const auth = { authorization: `Bearer ${token}` }
  t.equal((await fetch(`${one.url}/admin/gpu-timeline`)).status, 401, 'an admin route')

  const reserved = await fetch(`${two.url}/gpu/reserve`, { method: 'POST', headers: { ...auth, 'content-type': 'application/json' }, body: JSON.stringify({ outputType: 'text', model: 'qwq' }) })
  t.equal(reserved.status, 200)
  // no console page is open: replica one reads the shared store on its own, once a second
  type Answer = { from: string, to: string, bucketSeconds: number, observedSince: string | null, gpus: Array<{ id: string, name: string, computer: string, busy: Array<number | null> }> }
  const busyNow = (a: Answer, id: string): number | null | undefined => a.gpus.find((g) => g.id === id)?.busy.at(-1)
  let answer: Answer | undefined
  const deadline = Date.now() + 5000
  while (Date.now() < deadline) {
    const res = await fetch(`${one.url}/admin/gpu-timeline`, { headers: auth })
    t.equal(res.status, 200)
    answer = await res.json() as Answer
    if ((busyNow(answer, fleet.gpuIds[0]) ?? 0) > 0) break
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
  if (answer === undefined) throw new Error('no answer')
  t.equal(answer.bucketSeconds, 60)
  t.same(answer.gpus.map((g) => [g.id, g.name, g.busy.length]), fleet.gpuIds.map((id) => [id, `GPU ${id}`, 60]))
  t.ok((busyNow(answer, fleet.gpuIds[0]) ?? 0) > 0, `the reserved GPU is busy this minute (${busyNow(answer, fleet.gpuIds[0])})`)
  t.equal(busyNow(answer, fleet.gpuIds[1]), 0, 'the other is idle')
  t.equal(answer.gpus[0].busy[0], null, 'an hour ago this replica did not run yet')
  t.ok(answer.observedSince != null && Date.parse(answer.observedSince) <= Date.parse(answer.to))
  t.equal(Date.parse(answer.from) % 60_000, 0, 'minutes start on the minute')
})
