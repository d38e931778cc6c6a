"""VICReg (Bardes, Ponce & LeCun 2022) with Hard View Selection: expander, variance-invariance-covariance loss, method."""
