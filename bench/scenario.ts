/** A scenario of `npm run bench`: one file each in bench/scenarios/, listed and run by bench/run.ts. */
import type { GatewayFleet } from './gateway-fleet.js'
import type { SchedulingContext } from './scheduling.js'

export interface BenchContext extends SchedulingContext {
  /** --trace: the gateway times its own steps (bench/trace.ts) */
  trace: boolean
  /** --profile DIR */
  profile?: string
  /** --gateway-node-options */
  gatewayNodeOptions: string
  /** the 64-simulator fleet with the gateway and nginx, when a scenario run asks for it (Scenario.fleet) */
  fleet?: GatewayFleet
}

export interface Scenario {
  /** what `--only` names it by */
  letter: string
  name: string
  /** what it measures, for the runner's list */
  measures: string
  /** its goal, for the runner's list */
  goal: string
  /**
   * Runs on the 64-simulator fleet (bench/gateway-fleet.ts): 'warm' after its warm-up, 'cold' without;
   * `floors`: with the floors beside the gateway. Scenarios without it start what they need themselves.
   */
  fleet?: 'warm' | 'cold'
  floors?: boolean
  run: (ctx: BenchContext) => Promise<void>
}
