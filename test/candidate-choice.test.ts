// Which candidates a request leases among next, without a server (services/leases/candidate-choice.ts).
import t from 'tap'
import { CandidateRound, Cooldowns } from '../services/leases/candidate-choice.js'
import type { Assignment } from '../services/fleet/inventory.js'

const assignment = (id: string): Assignment => ({
  id, name: `a${id}`, model: 'm', modelKey: 'm', kind: 'llm', ip: '127.0.0.1', port: 1000 + Number(id),
  url: `http://127.0.0.1:${1000 + Number(id)}`, host: `127.0.0.1:${1000 + Number(id)}`, gpuIds: [id], weight: 0, capacity: 1, computerName: 'box'
})
const ids = (list: readonly Assignment[] | undefined): string[] | undefined => list?.map((a) => a.id)
const refused = Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' })

t.test('an unreachable candidate is not tried again by the same request, and sits out its cooldown for the others', async (t) => {
  const all = ['1', '2', '3'].map(assignment)
  const cooldowns = new Cooldowns(1000)
  const round = new CandidateRound(all, cooldowns, 'm')
  t.same(ids(round.next(0)), ['1', '2', '3'], 'every candidate, in preference order')
  round.unreachable(all[0], refused, 0)
  t.same(ids(round.next(0)), ['2', '3'])
  round.unreachable(all[1], refused, 10)
  t.same(ids(round.next(10)), ['3'])
  round.unreachable(all[2], refused, 20)
  t.equal(round.next(20), undefined, 'every candidate failed')
  t.equal(round.exhausted(), "no upstream for model 'm' is reachable (last: 'a3' ECONNREFUSED)")

  // another request: all three cooling, so all three (nothing else is left) ...
  const other = new CandidateRound(all, cooldowns, 'm')
  t.same(ids(other.next(500)), ['1', '2', '3'], 'in cooldown, tried when nothing else is left')
  // ... then only those whose cooldown is over
  t.same(ids(other.next(1005)), ['1'], 'a1 sat out its 1000 ms; a2 and a3 still cool')
  t.same(ids(other.next(1020)), ['1', '2', '3'])
  // a second refusal renews the cooldown
  cooldowns.sitOut('1', 1020)
  t.ok(cooldowns.cooling('1', 2019) && !cooldowns.cooling('1', 2020))
})
