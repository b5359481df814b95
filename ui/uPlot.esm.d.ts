// The types of uPlot's ES module, which the gateway serves beside the console's scripts
// (routes/ui/index.ts, from the `uplot` package): the page imports `./uPlot.esm.js`.
import uPlot from 'uplot'
export default uPlot
